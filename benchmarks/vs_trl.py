"""Side-by-side: our online DPO loop vs TRL's OnlineDPOTrainer, same work, same run, A B A B.

    bash benchmarks/setup_trl_env.sh          # once: .venv-trl with TRL 1.16 (CPU torch)
    .venv/bin/python benchmarks/vs_trl.py --repeats 2 --pairs 16

Each repeat runs our loop (benchmarks/ours_worker.py, main .venv) and then TRL
(benchmarks/trl_worker.py, .venv-trl), each in a fresh subprocess, one at a time, on the same
model folder, prompts and hyper-parameters. The headline is the ratio ours / TRL of trained
pairs per hour, where each side's seconds are the training loop's wall time *excluding* imports,
model loading and (ours) the vLLM engine start; per repeat the ratio pairs run i of each side, and
min / median / max are over repeats. Whole-process wall time (startup included) is reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from workload import add_workload_args  # noqa: E402

BENCH = REPO / "benchmarks"
MAIN_PY = REPO / ".venv" / "bin" / "python"
TRL_PY = REPO / ".venv-trl" / "bin" / "python"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    add_workload_args(p)
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS for both sides")
    p.add_argument("--first", choices=["ours", "trl"], default="ours",
                   help="which side is A in the A B A B order")
    p.add_argument("--model", default=None,
                   help="HF model folder (default: the embedded SmolLM2, converted once)")
    p.add_argument("--trl-gradient-checkpointing", action="store_true",
                   help="TRL's default setting; off by default to match our loop (on, TRL's "
                        "generate runs without a KV cache)")
    p.add_argument("--ours-source", default=None,
                   help="measure the online_dpo/ and judges/ in this folder instead of this repo's "
                        "working tree (e.g. a `git archive HEAD | tar -x -C DIR` export)")
    p.add_argument("--json", default=None, help="also write every number to this JSON file")
    p.add_argument("--logs", default=None, help="folder for each run's stdout/stderr "
                                                "(default: a new temp folder)")
    return p.parse_args(argv)


def worker_command(side: str, args, model: str) -> list[str]:
    py, script = (MAIN_PY, "ours_worker.py") if side == "ours" else (TRL_PY, "trl_worker.py")
    return [str(py), str(BENCH / script), "--model", model, "--pairs", str(args.pairs),
            "--micro-batch", str(args.micro_batch), "--grad-accum", str(args.grad_accum),
            "--max-tokens", str(args.max_tokens), "--temperature", str(args.temperature),
            "--top-p", str(args.top_p), "--beta", str(args.beta), "--lr", str(args.lr),
            "--seed", str(args.seed)] + (
                ["--source", args.ours_source] if side == "ours" and args.ours_source else []) + (
                ["--gradient-checkpointing"] if side == "trl" and args.trl_gradient_checkpointing
                else [])


def run_side(side: str, index: int, args, model: str, logs: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               TRL_EXPERIMENTAL_SILENCE="1")
    out_path, err_path = logs / f"{index:02d}_{side}.out", logs / f"{index:02d}_{side}.err"
    load_before = os.getloadavg()[0]
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.run(worker_command(side, args, model), stdout=out, stderr=err,
                              env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        tail = err_path.read_text()[-3000:]
        raise SystemExit(f"{side} run {index} failed (exit {proc.returncode}); {err_path}:\n{tail}")
    lines = [line for line in out_path.read_text().splitlines() if line.startswith("{")]
    result = json.loads(lines[-1])
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    result.update(process_wall_seconds=wall, process_cpu_seconds=cpu,
                  load_before=load_before, load_after=os.getloadavg()[0])
    return result


def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def fmt(s: dict, digits: int = 2) -> str:
    return f"median {s['median']:.{digits}f} (min {s['min']:.{digits}f}, max {s['max']:.{digits}f})"


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.pairs % (args.micro_batch * args.grad_accum):
        raise SystemExit("--pairs must be a multiple of --micro-batch x --grad-accum")
    if not TRL_PY.exists():
        raise SystemExit(f"{TRL_PY} is missing: run `bash benchmarks/setup_trl_env.sh` first")
    if args.model is None:
        sys.path.insert(0, str(REPO))
        from online_dpo.storage.model_files import ensure_smollm2_folder

        args.model = str(ensure_smollm2_folder())
    logs = Path(args.logs) if args.logs else Path(tempfile.mkdtemp(prefix="vs_trl_logs_"))
    logs.mkdir(parents=True, exist_ok=True)
    order = ["ours", "trl"] if args.first == "ours" else ["trl", "ours"]
    print(f"[vs_trl] model {args.model}; {args.pairs} pairs per run, {args.repeats} repeats, "
          f"order {' '.join(order)} ...; logs in {logs}", flush=True)

    runs: dict[str, list[dict]] = {"ours": [], "trl": []}
    index = 0
    for r in range(args.repeats):
        for side in order:
            index += 1
            res = run_side(side, index, args, args.model, logs)
            runs[side].append(res)
            print(f"[vs_trl] repeat {r + 1} {side:4s}: {res['pairs']} pairs in "
                  f"{res['seconds']:.1f} s -> {res['pairs_per_hour']:.0f} pairs/h "
                  f"(process {res['total_seconds']:.1f} s, startup {res['startup_seconds']:.1f} s, "
                  f"load avg before {res['load_before']:.2f})", flush=True)

    ratios = [o["pairs_per_hour"] / t["pairs_per_hour"] for o, t in zip(runs["ours"], runs["trl"])]
    prompt_ratios = [(o["prompts"] / o["seconds"]) / (t["prompts"] / t["seconds"])
                     for o, t in zip(runs["ours"], runs["trl"])]
    total_ratios = [(o["pairs"] / o["total_seconds"]) / (t["pairs"] / t["total_seconds"])
                    for o, t in zip(runs["ours"], runs["trl"])]
    no_eval_ratios = [
        (o["pairs"] / (o["seconds"] - o["phase_seconds"].get("eval", 0.0))) / (t["pairs"] / t["seconds"])
        for o, t in zip(runs["ours"], runs["trl"])]
    summary = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "logs")},
        "logs": str(logs),
        "runs": runs,
        "ours_pairs_per_hour": spread([o["pairs_per_hour"] for o in runs["ours"]]),
        "trl_pairs_per_hour": spread([t["pairs_per_hour"] for t in runs["trl"]]),
        "ratio_pairs_per_hour": spread(ratios),
        "ratio_prompts_per_hour": spread(prompt_ratios),
        "ratio_pairs_per_hour_total_wall": spread(total_ratios),
        "ratio_pairs_per_hour_ours_without_eval": spread(no_eval_ratios),
    }

    print("\n| repeat | side | pairs | loop s | pairs/h | process s | startup s | ties | "
          "tokens/completion | judge score | load before |")
    print("|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---:|")
    for r in range(args.repeats):
        for side in order:
            res = runs[side][r]
            ties = (f"{res['ties_dropped']} dropped" if side == "ours"
                    else f"{res['ties_given_to_first']} to 1st")
            print(f"| {r + 1} | {side} | {res['pairs']} | {res['seconds']:.1f} | "
                  f"{res['pairs_per_hour']:.0f} | {res['total_seconds']:.1f} | "
                  f"{res['startup_seconds']:.1f} | {ties} | {res['mean_completion_tokens']:.1f} | "
                  f"{res['mean_judge_score']:.3f} | {res['load_before']:.2f} |")
    phases: dict[str, list[float]] = {}
    for o in runs["ours"]:
        for name, s in o["phase_seconds"].items():
            phases.setdefault(name, []).append(s)
    print("\nours, seconds per phase (median over repeats): " + ", ".join(
        f"{name} {statistics.median(v):.1f}" for name, v in phases.items()))
    print(f"\nours pairs/h: {fmt(summary['ours_pairs_per_hour'], 0)}")
    print(f"TRL  pairs/h: {fmt(summary['trl_pairs_per_hour'], 0)}")
    print(f"ratio ours/TRL, pairs/h, loop time (excl. imports, model load, engine start): "
          f"{fmt(summary['ratio_pairs_per_hour'])}")
    print(f"ratio ours/TRL, prompts/h (ties counted as work done), loop time: "
          f"{fmt(summary['ratio_prompts_per_hour'])}")
    print(f"ratio ours/TRL, pairs/h, whole-process wall time (startup included): "
          f"{fmt(summary['ratio_pairs_per_hour_total_wall'])}")
    print(f"ratio ours/TRL, pairs/h, ours' loop time less its held-out eval phase: "
          f"{fmt(summary['ratio_pairs_per_hour_ours_without_eval'])}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
        print(f"[vs_trl] wrote {args.json}")
    return summary


if __name__ == "__main__":
    main()
