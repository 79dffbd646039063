"""Reference scoring of one round: 1 process against 2 processes (torchrun, gloo), side by side.

    .venv/bin/python benchmarks/shared_scoring_bench.py [--pairs 64] [--repeats 2]

A round of --pairs pairs on SmolLM2-135M-Instruct (float32, one torch thread per process): each
pair is a chat-templated prompt from recipes/data/prompts.jsonl and two completions of 24-96
tokens, 2 x pairs sequences in all, scored by `score_shared` as the train step scores its
reference. Each launch scores the round once to warm up, then times it --timed times; launches
alternate 1, 2, 1, 2 (--repeats). Reported per process count: the median wall time of a round,
each process's sequences and tokens, and the largest difference from the 1-process values.
Nothing is asserted; ratios come from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def round_sequences(tokenizer, pairs: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    from online_dpo.data.prompts import prompt_token_ids

    rows = [json.loads(line) for line in (REPO / "recipes/data/prompts.jsonl").read_text().splitlines()]
    rng = random.Random(seed)
    sequences = []
    for i in range(pairs):
        prompt = prompt_token_ids(tokenizer, rows[i % len(rows)]["prompt"])
        for _ in range(2):
            sequences.append((prompt, [rng.randrange(100, 40_000) for _ in range(rng.randint(24, 96))]))
    return sequences


def worker(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from online_dpo.storage.model_files import resolve_model_path
    from online_dpo.training.distributed import Processes
    from online_dpo.training.shared_scoring import score_shared, shares

    procs = Processes()
    folder = resolve_model_path("smollm2")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    sequences = round_sequences(tokenizer, args.pairs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def timed():
        procs.barrier()
        t0 = time.perf_counter()
        scored = score_shared(procs, model, sequences, pad, torch.device("cpu"))
        procs.barrier()
        return scored, time.perf_counter() - t0

    timed()  # warm-up
    runs = [timed() for _ in range(args.timed)]
    scored = runs[-1][0]
    if procs.main:
        parts = shares(sequences, procs.world)
        tokens = [sum(len(sequences[i][0]) + len(sequences[i][1]) for i in p) for p in parts]
        Path(args.out).write_text(json.dumps({
            "processes": procs.world, "seconds": statistics.median(s for _, s in runs),
            "per_process": scored.per_process, "tokens_per_process": tokens, "values": scored.values.tolist()}))


def launch(processes: int, args, out: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           __file__, "--worker", "--out", str(out), "--pairs", str(args.pairs), "--timed", str(args.timed)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    subprocess.run(cmd, check=True, cwd=REPO, env=env)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="launches of each process count, alternating")
    parser.add_argument("--timed", type=int, default=3, help="timed rounds per launch")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    results: dict[int, list[dict]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as work:
        for r in range(args.repeats):
            for n in (1, 2):
                results[n].append(launch(n, args, Path(work) / f"{n}_{r}.json"))
    one = results[1][0]["values"]
    base = statistics.median(x["seconds"] for x in results[1])
    print("| processes | round (s, median) | speed-up | sequences per process | tokens per process "
          "| max abs diff vs 1 process |\n|---|---|---|---|---|---|")
    for n, runs in results.items():
        seconds = statistics.median(x["seconds"] for x in runs)
        diff = max(abs(a - b) for a, b in zip(one, runs[-1]["values"], strict=True))
        print(f"| {n} | {seconds:.2f} | {base / seconds:.2f}x | {runs[-1]['per_process']} "
              f"| {runs[-1]['tokens_per_process']} | {diff:.2g} |")


if __name__ == "__main__":
    main()
