"""Where sampling and training time goes: operator profiles and sampler settings, one process.

1. vLLM sampling at a round's shape (`--prompts` prompts x `--n` samples, `--max-tokens` tokens,
   EOS ignored so every variant does the same work), timed for sampler settings that change the
   cost per token: top-p 0.95 by our top-k search (the default on CPU) or by vLLM's sort of the
   whole vocabulary, top-p 1.0, a seed per request vs none, and the sampled token's log-prob vs none. Alternated, `--repeats` times;
   prints median tok/s and each variant's ratio to the recipe's setting.
2. The torch operator profile (self CPU time) of one such generate call.
3. The torch operator profile of training micro-steps (the trainer's packed forward+backward) on
   `--micro-pairs` pairs of chat prompts with random completions of 10-64 tokens.

    .venv/bin/python benchmarks/phase_profile.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

VARIANTS = {  # name: SamplingParams changes from the recipe's setting ("sort": vLLM's own top-p)
    "recipe (top-p 0.95, seeded, log-probs)": {},
    "top-p 0.95 by vLLM's full sort": {"sort": True},
    "top-p 1.0": {"top_p": 1.0},
    "no per-request seed": {"seed": None},
    "no log-probs": {"logprobs": None},
    "all three": {"top_p": 1.0, "seed": None, "logprobs": None},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--n", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--micro-pairs", type=int, default=4)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rows", type=int, default=12, help="operators per profile table")
    args = p.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(REPO))
    import torch
    from torch.profiler import ProfilerActivity, profile

    from online_dpo.config.recipe import load_recipe
    from online_dpo.sampling import top_p
    from online_dpo.sampling.weight_sync import build_generator
    from online_dpo.training.logprobs import completion_logps
    from online_dpo.training.models import Models

    recipe = load_recipe(str(REPO / "recipes" / "concise_answers.yaml"), [])
    models = Models(recipe)
    prompts = [json.loads(line)["prompt"] for line in (REPO / "recipes/data/prompts.jsonl").open()]
    prompt_ids = [models.prompt_ids(x) for x in prompts[:args.prompts]]
    generator = build_generator(recipe, models.model_dir, models.eos_ids, models.pad_id)
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    requests = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids]

    def generate(max_tokens=args.max_tokens, **changes) -> float:
        settings = {"n": args.n, "temperature": 0.8, "top_p": 0.95, "max_tokens": max_tokens,
                    "logprobs": 0, "ignore_eos": True, **changes}
        seeded = settings.pop("seed", 0) is not None
        if settings.pop("sort", False):
            top_p.uninstall()
        params = [SamplingParams(**settings, **({"seed": i} if seeded else {})) for i in range(len(requests))]
        try:
            t0 = time.perf_counter()
            out = generator.llm.generate(requests, params, use_tqdm=False)
            seconds = time.perf_counter() - t0
        finally:
            top_p.install()  # build_generator's default on CPU
        return sum(len(o.token_ids) for r in out for o in r.outputs) / seconds

    def table(prof) -> str:
        return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows,
                                         max_name_column_width=48)

    try:
        generate(max_tokens=8)  # warm-up
        speeds = {name: [] for name in VARIANTS}
        for _ in range(args.repeats):
            for name, changes in VARIANTS.items():
                speeds[name].append(generate(**changes))
        base = statistics.median(speeds[next(iter(VARIANTS))])
        print(f"\nvLLM sampling, {args.prompts} prompts x {args.n} x {args.max_tokens} tokens, "
              f"torch threads {torch.get_num_threads()}: median tok/s (all repeats), ratio to the recipe's")
        for name, values in speeds.items():
            median = statistics.median(values)
            print(f"  {name:40s} {median:7.1f}  ({', '.join(f'{v:.1f}' for v in values)})  x{median / base:.2f}")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            generate()
        print("\nvLLM generate, the recipe's setting: operators by self CPU time\n" + table(prof))
    finally:
        generator.close()

    model = models.policy.train()
    rng = random.Random(0)

    def micro_batch():
        pairs = []
        for _ in range(args.micro_pairs):
            prompt = models.prompt_ids(rng.choice(prompts))
            pairs.append([(prompt, [rng.randrange(100, 40000) for _ in range(rng.randint(10, 64))])
                          for _ in range(2)])
        return [c for c, _ in pairs] + [r for _, r in pairs]

    def step():
        summed, _ = completion_logps(model, micro_batch(), models.pad_id, models.device)
        summed.sum().backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(2):
            step()
        seconds = (time.perf_counter() - t0) / 2
    print(f"\ntraining micro-step ({args.micro_pairs} pairs, packed, forward+backward), "
          f"{seconds:.2f} s each: operators by self CPU time\n" + table(prof))


if __name__ == "__main__":
    main()
