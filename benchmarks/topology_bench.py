"""Pairs per hour and weight-sync cost of the three sampler topologies, side by side in one run.

    .venv/bin/python benchmarks/topology_bench.py [--repeats 1] [--threads 1] [key=value ...]

Each topology runs the same short real run of SmolLM2 (the quickstart's task, 2 rounds x 16
problems x 4 samples, 1 epoch, held-out eval of 16 problems at the end) as a fresh process, in
turn, A B C A B C:
- in_process: one process, vLLM in it (`generation.backend: vllm`);
- per_process: 2 processes (torchrun, gloo), an engine on each (`generation.engines: every_process`);
- server: one trainer process and a `vllm serve` that online-dpo launches
  (`generation.backend: vllm_server`), weights through /dev/shm files and vLLM's RL API.
Every process gets `--threads` torch/OMP threads. Loop seconds are the rounds' wall time (imports,
model loads and engine or server start excluded, as in vs_trl.py); pairs are the pairs trained.
Sync seconds are the gather + transfer + load (`sync.json`'s sync_seconds, without the probe), and
bytes per second divides the weights' bytes by it. Then the sync time of 1B, 8B and 70B models in
bf16 is projected on paper from each measured rate, against NCCL over NVLink and InfiniBand.
One run on a shared, noisy machine: ratios measured here, not assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORK = ["rounds=2", "data.prompts_per_round=16", "data.eval_prompts=16", "eval.samples_per_prompt=1",
        "eval.every=0", "eval.win_rate_vs_pi0=false", "train.epochs=1"]
TOPOLOGIES = {
    "in_process": ([], 1),
    "per_process": (["generation.engines=every_process"], 2),
    "server": (["generation.backend=vllm_server", "generation.server.launch={}"], 1),
}
# Published peak rates to project against (bytes/s): NVLink 4 on H100, 450 GB/s each way (NVIDIA's
# 900 GB/s is both directions); one 400 Gb/s NDR InfiniBand NIC, 50 GB/s. NCCL reaches ~80-90% of
# them in nccl-tests, so these are upper bounds for a broadcast of the weights.
NCCL_REFERENCE = {"NCCL over NVLink 4 (450 GB/s)": 450e9, "NCCL over NDR InfiniBand (50 GB/s)": 50e9}
MODELS = {"1B": 1e9, "8B": 8e9, "70B": 70e9}  # parameters; bf16 on the wire: 2 bytes each


def run_once(topology: str, repeat: int, out: Path, threads: int, extra: list[str]) -> dict:
    overrides, processes = TOPOLOGIES[topology]
    name = f"{topology}_r{repeat}"
    args = ["run", "recipes/quickstart.yaml", *WORK, *overrides, *extra, f"name={name}", f"output_dir={out}"]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                 "-m", "online_dpo.cli"] if processes > 1 else [sys.executable, "-m", "online_dpo.cli"])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([*launcher, *args], cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        raise SystemExit(f"{topology} failed (log: {out / name}.log):\n{proc.stderr[-3000:]}")
    run = out / name
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    syncs = [json.loads((run / f"round_{r['round']}" / "sync.json").read_text()) for r in rows]
    syncs = [s for s in syncs if "sync_seconds" in s]
    loop = sum(r["round_seconds"] for r in rows)
    pairs = sum(r.get("train_pairs") or 0 for r in rows)
    sync_s = statistics.median(s["sync_seconds"] for s in syncs)
    nbytes = syncs[0]["bytes"]
    return {"topology": topology, "repeat": repeat, "processes": processes, "wall_seconds": wall,
            "loop_seconds": loop, "pairs": pairs, "pairs_per_hour": pairs / loop * 3600,
            "sync_seconds": sync_s, "verify_seconds": statistics.median(s["verify_seconds"] for s in syncs),
            "sync_bytes": nbytes, "bytes_per_second": nbytes / sync_s,
            "sample_seconds": sum(json.loads((run / f"round_{r['round']}" / "sample.json").read_text())["seconds"]
                                  for r in rows)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", help="extra recipe overrides for every run, key=value")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="OMP/torch threads of every process")
    p.add_argument("--only", nargs="*", choices=list(TOPOLOGIES), default=list(TOPOLOGIES))
    p.add_argument("--json", default="runs/bench/topology_bench.json")
    p.add_argument("--keep", action="store_true", help="keep the runs' folders")
    args = p.parse_args(argv)
    out = Path(tempfile.mkdtemp(prefix="topology_bench_"))
    print(f"runs and logs in {out}", flush=True)
    results = []
    for repeat in range(args.repeats):
        for topology in args.only:
            r = run_once(topology, repeat, out, args.threads, args.overrides)
            results.append(r)
            print(f"repeat {repeat + 1} {topology:>11}: {r['pairs']:3d} pairs in {r['loop_seconds']:6.1f} s "
                  f"-> {r['pairs_per_hour']:6.0f} pairs/h; sampling {r['sample_seconds']:5.1f} s; sync "
                  f"{r['sync_seconds']:.2f} s + probe {r['verify_seconds']:.2f} s "
                  f"({r['bytes_per_second'] / 1e9:.2f} GB/s)", flush=True)
    summary = {}
    for topology in args.only:
        mine = [r for r in results if r["topology"] == topology]
        summary[topology] = {key: statistics.median(r[key] for r in mine)
                             for key in ("pairs_per_hour", "loop_seconds", "sync_seconds", "verify_seconds",
                                         "bytes_per_second", "sample_seconds")}
    print("\n| topology | processes | pairs/h | loop s | sampling s | sync s | probe s | GB/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for topology, s in summary.items():
        print(f"| {topology} | {TOPOLOGIES[topology][1]} | {s['pairs_per_hour']:.0f} | {s['loop_seconds']:.1f} | "
              f"{s['sample_seconds']:.1f} | {s['sync_seconds']:.2f} | {s['verify_seconds']:.2f} | "
              f"{s['bytes_per_second'] / 1e9:.2f} |")
    rates = {f"{t} (measured)": s["bytes_per_second"] for t, s in summary.items()} | NCCL_REFERENCE
    print("\nSync time on paper, bf16 weights (2 bytes per parameter):\n")
    print("| transport | " + " | ".join(MODELS) + " |")
    print("|---|" + "---:|" * len(MODELS))
    for label, rate in rates.items():
        print(f"| {label} | " + " | ".join(f"{2 * n / rate:.3g} s" for n in MODELS.values()) + " |")
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"results": results, "summary": summary, "threads": args.threads}, indent=2) + "\n")
    print(f"\nwrote {path}")
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
