"""Asynchronous online DPO: pairs per hour at staleness 0, 1 and 2 against one `vllm serve`, and
today's in-process loop, side by side in one run.

    .venv/bin/python benchmarks/async_bench.py [--rounds 4] [--prompts 16] [--json out.json]

Two devices stand in for one trainer and one sampler: the trainer process is pinned to core 0 and
the `vllm serve` of SmolLM2-135M-Instruct to core 1 (taskset; one thread each, vLLM's OpenMP threads
bound by VLLM_CPU_OMP_THREADS_BIND). One server serves every server arm, one after the other:
- sync: generation.backend: vllm_server, max_staleness 0 (each round samples its own policy);
- stale1, stale2: max_staleness 1 and 2 (rounds drawn ahead while the trainer trains);
- in_process: generation.backend: vllm, trainer and engine together on core 0.
The work is the quickstart's task (times tables and sums, the exact-answer judge, best-vs-worst,
2 epochs, the reference swapped every round), held-out eval on the last round only.

Measured from the steps' own records (round_<k>/<step>.json: started_at, seconds):
- loop seconds: from the first step's start to the last step's end (the model load and the engine
  start are outside it, and the same for every arm);
- pairs per hour: trained pairs / loop seconds;
- sampler-side busy: the sample steps and held-out sampling (the server generating); trainer-side
  busy: every other step (judge, pairs, train, sync, the eval's KL forwards and judging, reference).
  Idle share = 1 - busy / loop seconds. Sync counts on the trainer's side: the trainer writes the
  weights and runs the probe while the server loads them, and nothing overlaps a sync.
- The bound, from the sync arm: with T (trainer side) and S (sampler side) per round, overlap
  can give at most (T + S) / max(T, S).
- Overlap: an arm's own busy seconds, both sides, over its loop seconds (1 when nothing overlaps),
  beside its own bound. Staleness changes the work (the pairs kept, the answers' lengths), so the
  arms' loop times compare different work; this compares each arm with itself.
Nothing is asserted; the ratios come from one run.
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

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TRAINER_CORE, SAMPLER_CORE = 0, 1
SAMPLER_STEPS = ("sample",)


def recipe(name: str, out: Path, args, generation: dict) -> dict:
    return {
        "name": name, "rounds": args.rounds, "seed": 0, "output_dir": str(out),
        "data": {"prompts": str(REPO / "recipes/data/times_and_sums.jsonl"), "prompts_per_round": args.prompts,
                 "eval_prompts": 100, "eval_split": "tail"},
        "generation": {"samples_per_prompt": 4, "temperature": 1.0, "top_p": 1.0, "max_tokens": args.max_tokens,
                       **generation},
        "judge": {"target": "judges.functions:ExactAnswerJudge", "kwargs": {"column": "answer"}},
        "loss": {"loss_type": "sigmoid", "beta": 0.1},
        "train": {"learning_rate": 1.0e-5, "epochs": 2, "micro_batch_pairs": 4, "grad_accum_steps": 2},
        "reference": {"schedule": "swap", "swap_every_rounds": 1},
        "eval": {"samples_per_prompt": 1, "every": 0, "win_rate_vs_pi0": False},
    }


def run_arm(name: str, data: dict, tmp: Path, core: int, extra_env: dict) -> dict:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", **extra_env}
    t0 = time.perf_counter()
    done = subprocess.run(["taskset", "-c", str(core), sys.executable, "-m", "online_dpo.cli", "run", str(path),
                           "--threads", "1"], cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (tmp / f"{name}.log").write_text(done.stdout + done.stderr)
    if done.returncode:
        raise SystemExit(f"{name} failed (rc {done.returncode}); its log: {tmp / f'{name}.log'}\n{done.stderr[-2000:]}")
    return {**phase_timeline(Path(data["output_dir"]) / name, data["rounds"]), "process_seconds": wall}


def phase_timeline(run_dir: Path, rounds: int) -> dict:
    steps = []
    for k in range(1, rounds + 1):
        for f in sorted((run_dir / f"round_{k}").glob("*.json")):
            record = json.loads(f.read_text())
            if f.stem != "metrics" and "started_at" in record:
                steps.append((k, f.stem, record))
    start = min(r["started_at"] for _, _, r in steps)
    end = max(r["started_at"] + r["seconds"] for _, _, r in steps)
    loop = end - start
    eval_generation = sum(r.get("eval_generation_seconds", 0) for _, name, r in steps if name == "eval")
    sampler = sum(r["seconds"] for _, name, r in steps if name in SAMPLER_STEPS) + eval_generation
    trainer = sum(r["seconds"] for _, name, r in steps if name not in SAMPLER_STEPS) - eval_generation
    pairs = sum(json.loads((run_dir / f"round_{k}" / "train.json").read_text()).get("train_pairs", 0)
                for k in range(1, rounds + 1))
    staleness = [json.loads((run_dir / f"round_{k}" / "metrics.json").read_text())["staleness"]
                 for k in range(1, rounds + 1)]
    return {"loop_seconds": loop, "pairs": pairs, "pairs_per_hour": pairs / loop * 3600,
            "sampler_busy_seconds": sampler, "trainer_busy_seconds": trainer,
            "sampler_idle_share": 1 - sampler / loop, "trainer_idle_share": 1 - trainer / loop,
            "staleness": staleness}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--arms", default="sync,stale1,stale2,in_process")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import torch

    from online_dpo.config.recipe import ServerLaunchConfig
    from online_dpo.sampling.vllm_server import LaunchedServer
    from online_dpo.storage.model_files import ensure_smollm2_folder

    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs 2 cores: one for the trainer, one for the sampler")
    tmp = Path(tempfile.mkdtemp(prefix="async-bench-"))
    out = tmp / "runs"
    print(f"runs and logs in {tmp}", flush=True)
    model = ensure_smollm2_folder()
    # The server inherits this process's affinity at its start: core 1 alone.
    everything = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {SAMPLER_CORE})
    os.environ.update(OMP_NUM_THREADS="1", VLLM_CPU_OMP_THREADS_BIND=str(SAMPLER_CORE))
    try:
        server = LaunchedServer(model, ServerLaunchConfig(), dtype=torch.float32, kv_cache_gib=1,
                                log_path=tmp / "server.log")
    finally:
        os.sched_setaffinity(0, everything)
    on_server = {"backend": "vllm_server", "server": {"url": server.url, "timeout_s": 300}}
    arms = {
        "sync": (on_server, {}),
        "stale1": ({**on_server, "max_staleness": 1}, {}),
        "stale2": ({**on_server, "max_staleness": 2}, {}),
        # Trainer and engine share core 0, as today's loop on one device.
        "in_process": ({"backend": "vllm"}, {"VLLM_CPU_OMP_THREADS_BIND": str(TRAINER_CORE)}),
    }
    results = {}
    try:
        for name in args.arms.split(","):
            generation, env = arms[name]
            results[name] = run_arm(name, recipe(name, out, args, generation), tmp, TRAINER_CORE, env)
            r = results[name]
            print(f"{name}: {r['pairs_per_hour']:.0f} pairs/h, loop {r['loop_seconds']:.1f} s, sampler idle "
                  f"{r['sampler_idle_share']:.2f}, trainer idle {r['trainer_idle_share']:.2f}", flush=True)
    finally:
        server.stop()
    if "sync" in results:
        sync = results["sync"]
        t, s = sync["trainer_busy_seconds"] / args.rounds, sync["sampler_busy_seconds"] / args.rounds
        bound = (t + s) / max(t, s)
        summary = {"trainer_seconds_per_round": t, "sampler_seconds_per_round": s, "bound": bound}
        for name, r in results.items():
            # Loop time is the overlap itself; pairs per hour also counts the pairs a staler
            # sample keeps or loses, which is the quality arm's question, not the hardware's.
            loop_speedup = sync["loop_seconds"] / r["loop_seconds"]
            speedup = r["pairs_per_hour"] / sync["pairs_per_hour"]
            # The overlap alone: the arm's own steps, run in turn, against its loop. The arms do not do
            # the same work (staleness changes the pairs kept and the answers' lengths), so this is
            # the figure the overlap's design answers for.
            own_t, own_s = r["trainer_busy_seconds"], r["sampler_busy_seconds"]
            overlap = (own_t + own_s) / r["loop_seconds"]
            summary[name] = {"loop_vs_sync": loop_speedup, "loop_share_of_bound": loop_speedup / bound,
                             "pairs_per_hour_vs_sync": speedup, "pairs_per_hour_share_of_bound": speedup / bound,
                             "overlap": overlap, "overlap_share_of_own_bound": overlap / ((own_t + own_s) / max(own_t, own_s))}
        results["summary"] = summary
        print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
