"""Sampling throughput: our in-process vLLM generator vs plain transformers `generate`, A B A B.

    .venv/bin/python benchmarks/sampling_bench.py                 # 16 prompts x n=4 x 64 tokens
    .venv/bin/python benchmarks/sampling_bench.py --repeats 2

Both generators are built once through `online_dpo.training.models.build_generator` from the same recipe
(default `recipes/concise_answers.yaml`), differing only in `generation.backend` (vllm / transformers),
and get the same chat-formatted prompt ids (`Models.prompt_ids`) and the same `SamplingSettings`.
Then the same sampling call is timed on each, alternating A B A B for `--repeats` rounds.
tokens/s counts the tokens each backend returned (up to and including EOS), as the pipeline's
`tokens_per_second` does. The ratio vLLM / HF pairs repeat i of each side; min / median / max are
over repeats. Our issue's goal: vLLM >= 1.5x HF generate.

One run on a shared, noisy machine: ratios measured here, not assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

# Must be set before vllm is imported (the generator module also sets it): the in-process engine.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", help="recipe overrides, key=value (model.path=...)")
    p.add_argument("--recipe", default=str(REPO / "recipes" / "concise_answers.yaml"))
    p.add_argument("--prompts-file", default=str(REPO / "recipes" / "data" / "prompts.jsonl"))
    p.add_argument("--prompts", type=int, default=16, help="first N prompts of the file")
    p.add_argument("--n", type=int, default=4, help="completions per prompt")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0, help="same seed every repeat: identical work")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--first", choices=["vllm", "hf"], default="vllm", help="A in A B A B")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip the small untimed warm-up call on each backend")
    p.add_argument("--threads", type=int, default=None,
                   help="set OMP_NUM_THREADS before torch/vllm are imported (default: as is)")
    p.add_argument("--out", default="runs/bench/sampling_bench.json", help="JSON results file")
    args = p.parse_args(argv)
    for item in args.overrides:
        if "=" not in item:
            p.error(f"override {item!r} is not key=value")
        if item.split("=", 1)[0].strip() == "generation.backend":
            p.error("generation.backend is set by the benchmark (both are run)")
    return args


def load_prompts(path: str, count: int) -> list:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if len(rows) < count:
        raise SystemExit(f"{path} has {len(rows)} prompts, fewer than --prompts {count}")
    return [r["prompt"] for r in rows[:count]]


def timed_generate(generator, prompt_ids, settings) -> dict:
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    outputs = generator.generate(prompt_ids, settings)
    seconds = time.perf_counter() - t0
    completions = [c for per_prompt in outputs for c in per_prompt]
    tokens = sum(len(c.token_ids) for c in completions)
    return {"seconds": seconds, "tokens": tokens, "tokens_per_second": tokens / seconds,
            "completions": len(completions),
            "mean_length": tokens / max(len(completions), 1),
            "eos_rate": sum(c.finished for c in completions) / max(len(completions), 1),
            "load_average_before": load_before}


def summary(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def main(argv=None) -> int:
    args = parse_args(argv)
    load_start = os.getloadavg()[0]
    if args.threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)

    import torch

    from online_dpo.config.recipe import load_recipe
    from online_dpo.sampling.generator import SamplingSettings
    from online_dpo.sampling.weight_sync import build_generator
    from online_dpo.training.models import Models

    recipes = {side: load_recipe(args.recipe, [*args.overrides, f"generation.backend={backend}"])
               for side, backend in (("vllm", "vllm"), ("hf", "transformers"))}
    t0 = time.perf_counter()
    models = Models(recipes["vllm"])  # tokenizer, chat template, eos / pad ids, model folder
    prompt_ids = [models.prompt_ids(p) for p in load_prompts(args.prompts_file, args.prompts)]
    load_seconds = time.perf_counter() - t0
    settings = SamplingSettings(args.n, args.temperature, args.top_p, args.max_tokens, args.seed)
    warm = SamplingSettings(1, args.temperature, args.top_p, 8, args.seed + 1)

    generators, start_seconds, warmup = {}, {}, {}
    try:
        for side in ("vllm", "hf"):  # vLLM first: its env must be set before anything imports it
            t0 = time.perf_counter()
            generators[side] = build_generator(recipes[side], models.model_dir, models.eos_ids,
                                               models.pad_id)
            start_seconds[side] = time.perf_counter() - t0
            if not args.no_warmup:
                warmup[side] = timed_generate(generators[side], prompt_ids[:2], warm)
        order = [args.first, "hf" if args.first == "vllm" else "vllm"]
        runs: dict[str, list[dict]] = {"vllm": [], "hf": []}
        for i in range(args.repeats):
            for side in order:
                r = timed_generate(generators[side], prompt_ids, settings)
                runs[side].append(r)
                print(f"repeat {i + 1} {side:>4}: {r['tokens']:>5} tokens in {r['seconds']:6.2f} s "
                      f"= {r['tokens_per_second']:7.1f} tok/s (mean len {r['mean_length']:.1f}, "
                      f"EOS {r['eos_rate']:.2f}, load avg before {r['load_average_before']:.2f})",
                      flush=True)
    finally:
        for gen in generators.values():
            gen.close()

    tps = {side: [r["tokens_per_second"] for r in runs[side]] for side in runs}
    ratios = [v / h for v, h in zip(tps["vllm"], tps["hf"], strict=True)]
    result = {
        "note": "one run on a shared, noisy machine; ratios, not assertions",
        "work": {"prompts": args.prompts, "n": args.n, "max_tokens": args.max_tokens,
                 "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed,
                 "prompt_tokens": sum(len(p) for p in prompt_ids)},
        "order": order, "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(), "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "models_load_seconds": load_seconds, "generator_start_seconds": start_seconds,
        "warmup": warmup, "runs": runs,
        "tokens_per_second": {side: summary(v) for side, v in tps.items()},
        "ratio_vllm_over_hf": {**summary(ratios), "per_repeat": ratios},
        "goal_ratio": 1.5,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "argv": sys.argv,
    }

    print()
    print("=" * 90)
    w = result["work"]
    print(f"sampling_bench: {w['prompts']} prompts x n={w['n']} x max_tokens {w['max_tokens']}, "
          f"temperature {w['temperature']}, top_p {w['top_p']}, seed {w['seed']}; "
          f"order {' '.join(order)} x {args.repeats}")
    print(f"torch threads {result['torch_threads']}, OMP_NUM_THREADS "
          f"{result['omp_num_threads']}, cpus {result['cpu_count']}, 1-min load average "
          f"{load_start:.2f} at start, {result['load_average_end'][0]:.2f} at end")
    print("NOTE: one run on a shared, noisy machine; ratios measured in this run, not assertions.")
    print("      With other jobs running, 2 torch threads can be many times slower than 1: "
          "try --threads 1.")
    print(f"generator start: vLLM {start_seconds['vllm']:.1f} s (incl. import), "
          f"HF {start_seconds['hf']:.1f} s")
    for side, label in (("vllm", "vLLM"), ("hf", "HF generate")):
        s = result["tokens_per_second"][side]
        print(f"{label:>12} tok/s: min {s['min']:7.1f}  median {s['median']:7.1f}  "
              f"max {s['max']:7.1f}")
    r = result["ratio_vllm_over_hf"]
    print(f"ratio vLLM/HF (per repeat): min {r['min']:.2f}  median {r['median']:.2f}  "
          f"max {r['max']:.2f}   (goal >= 1.5)")
    print(f"peak RSS {result['peak_rss_gib']:.2f} GiB")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
