"""Peak memory and round time: LoRA vs full fine-tuning on the quickstart, same run otherwise.

    .venv/bin/python benchmarks/lora_memory.py [--rounds 1] [--rank 16] [--threads 1]

Each mode is one `online-dpo run recipes/concise_answers.yaml` in its own process (real vLLM sampling,
weight sync verified by the probe, DPO training, evaluation), both with `reference.schedule:
fixed` so full fine-tuning keeps its usual policy + reference pair. Peak RSS is the child's
`ru_maxrss`, read by a fresh wrapper process per mode so one mode's peak never hides the other's.
Nothing is asserted; the ratio comes from this one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WRAPPER = (
    "import resource, subprocess, sys, time; t = time.time(); "
    "rc = subprocess.run(sys.argv[1:]).returncode; "
    "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc, time.time() - t)"
)


def run_mode(name: str, overrides: list[str], out: Path, threads: int | None) -> dict:
    cmd = [sys.executable, "-c", WRAPPER, str(REPO / ".venv/bin/online-dpo"), "run",
           str(REPO / "recipes/concise_answers.yaml"), f"name={name}", f"output_dir={out}", *overrides]
    if threads:
        cmd[5:5] = ["--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    line = [x for x in done.stdout.splitlines() if x.startswith("PEAK")]
    if not line or line[-1].split()[2] != "0":
        raise SystemExit(f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    _, kib, _, seconds = line[-1].split()
    rows = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
    return {"peak_rss_gib": int(kib) / 2**20, "process_seconds": float(seconds),
            "train_seconds": sum(r["phase_seconds"]["train"] for r in rows),
            "probe_max_abs_diff": max(r["probe_max_abs_diff"] or 0 for r in rows),
            "loss": rows[-1]["loss"], "judge_score": rows[-1]["judge_score"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    common = [f"rounds={args.rounds}", "reference.schedule=fixed"]
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            "full": run_mode("full", common, Path(tmp), args.threads),
            "lora": run_mode("lora", [*common, f"train.lora.rank={args.rank}",
                                      f"train.lora.alpha={2 * args.rank}", "train.learning_rate=1e-4"],
                             Path(tmp), args.threads),
        }
    for name, r in results.items():
        print(f"{name:5s} peak RSS {r['peak_rss_gib']:.2f} GiB, process {r['process_seconds']:.0f} s, "
              f"train {r['train_seconds']:.1f} s, probe |diff| {r['probe_max_abs_diff']:.2g}, "
              f"loss {r['loss']:.4f}, judge score {r['judge_score']:.3f}")
    full, lora = results["full"], results["lora"]
    print(f"LoRA / full: peak RSS {lora['peak_rss_gib'] / full['peak_rss_gib']:.2f}, "
          f"train seconds {lora['train_seconds'] / full['train_seconds']:.2f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
