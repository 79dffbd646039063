"""Reward-model judge samples per second: each prompt's samples batched alone, against the round's
samples batched across prompts (sorted by length, under a token budget), side by side.

    .venv/bin/python benchmarks/reward_model_bench.py [--prompts 64] [--repeats 3]

The reward model is trained first by `online-dpo train-rm` from SmolLM2-135M-Instruct, on pairs
made from recipes/data/prompts.jsonl (a direct answer chosen over a rambling one), unless
--reward-model names a folder. A round is --prompts prompts x 4 samples of different lengths.
"per prompt" is the judge step before this change (`score_many` per prompt: a forward of 4);
"across prompts" is the step now (`prefetch_scores` over the round, then each prompt reads its
scores). Both go through ReliableJudge with no cache, A B A B, 1 torch thread; scores must
agree. Ratios from one run; nothing is asserted.
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

ANSWERS = ["Yes.", "It depends, but mostly yes.",
           "Short answer: yes. Longer answer: it depends on what you need, when and for whom.",
           "Well, there are many ways to look at this question, and before answering it properly we "
           "should consider the history, the context, the people involved and several other factors."]


def train_reward_model(work: Path) -> Path:
    rows = [json.loads(line) for line in (REPO / "recipes/data/prompts.jsonl").read_text().splitlines()]
    pairs = work / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": ANSWERS[1], "rejected": ANSWERS[3]}) + "\n"
                             for r in rows[:48]))
    out = work / "reward_model"
    cmd = [sys.executable, "-m", "online_dpo.cli", "train-rm", str(pairs), "--out", str(out), "--epochs", "1"]
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    return out


def judge_round(judge, prompts, across: bool) -> tuple[list, float]:
    t0 = time.perf_counter()
    if across:
        judge.prefetch_scores([(row, text) for row, texts in prompts for text in texts])
    scores = [judge.score_many(row, texts) for row, texts in prompts]
    return scores, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reward-model", default=None, help="a reward model folder (default: train one)")
    args = parser.parse_args()

    import torch

    from judges.reliable import ReliableJudge
    from judges.reward_model import RewardModelJudge

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="rm-bench-"))
    path = Path(args.reward_model) if args.reward_model else train_reward_model(work)
    rows = [json.loads(line) for line in (REPO / "recipes/data/prompts.jsonl").read_text().splitlines()]
    rng = random.Random(0)
    prompts = [({"prompt": r["prompt"]}, rng.sample(ANSWERS, len(ANSWERS))) for r in rows[:args.prompts]]
    samples = len(prompts) * len(ANSWERS)
    model = RewardModelJudge(str(path), dtype="float32", device="cpu")
    seconds: dict[bool, list[float]] = {False: [], True: []}
    scores = {}
    for _ in range(args.repeats):
        for across in (False, True):
            judge = ReliableJudge(model, fingerprint=f"bench-{time.perf_counter()}")  # a fresh in-memory cache
            scores[across], s = judge_round(judge, prompts, across)
            seconds[across].append(s)
            print(json.dumps({"across_prompts": across, "seconds": s, "samples": samples}), flush=True)
    flat = {k: [v for prompt in scores[k] for v, _ in prompt] for k in scores}
    worst = max(abs(a - b) for a, b in zip(flat[False], flat[True], strict=True))
    per, across = statistics.median(seconds[False]), statistics.median(seconds[True])
    print(f"\n{len(prompts)} prompts x {len(ANSWERS)} samples, median of {args.repeats}, "
          f"max |score difference| {worst:.2g}\n")
    print("| batching | seconds | samples/s | × per prompt |")
    print("|---|---:|---:|---:|")
    print(f"| per prompt (4 per forward) | {per:.2f} | {samples / per:.1f} | 1.00× |")
    print(f"| across prompts (length-sorted, ≤ 16 per forward) | {across:.2f} | {samples / across:.1f} | "
          f"{per / across:.2f}× |")


if __name__ == "__main__":
    main()
