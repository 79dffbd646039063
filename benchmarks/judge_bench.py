"""LLM-as-judge comparisons per second through the whole judge step, serial against concurrent.

    .venv/bin/python benchmarks/judge_bench.py [--prompts 24] [--levels 1 4 16 64]

One real `vllm serve` of SmolLM2-135M-Instruct on 127.0.0.1 (launched as a run launches it) is
the judge's server. The same round is judged at each `judge.concurrency` level in turn, A B A B
when --repeats is 2: `--prompts` prompts from recipes/data/prompts.jsonl, each with 4 canned
responses of different lengths, best-vs-worst by round robin (6 comparisons per prompt), through
`judge_prompts` and the recipe's judge stack (ReliableJudge: retries, timeouts; no cache, so each
level pays for every call). Reported: comparisons per second, the speed-up over serial, and
whether every level's judgments equal serial's (vLLM batches concurrent requests, and a batch
may round a near-tie differently at temperature 0). Ratios from one run; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RESPONSES = ["Yes.", "It depends on the details, but mostly yes.",
             "Short answer: yes. Longer answer: it depends on what you need and when you need it.",
             "I am not sure; let me think about it and get back to you with a proper answer later on."]


def judge_round(url: str, prompts: list, concurrency: int) -> tuple[list[dict], float]:
    from judges.loading import build_judge_stack
    from online_dpo.config.recipe import JudgeConfig
    from online_dpo.pipeline.pair_selection import judge_prompts

    cfg = JudgeConfig(target="judges.llm:LLMJudge", concurrency=concurrency, timeout_s=120, cache=False,
                      kwargs={"backend": "http", "model": "smollm2", "base_url": f"{url}/v1", "timeout_s": 120})
    judge, _ = build_judge_stack(cfg)
    t0 = time.perf_counter()
    records = list(judge_prompts(judge, prompts, "best_vs_worst", random.Random(0), concurrency=concurrency))
    seconds = time.perf_counter() - t0
    judge.close()
    return records, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    import torch

    from online_dpo.config.generation import ServerLaunchConfig
    from online_dpo.sampling.vllm_server import LaunchedServer
    from online_dpo.storage.model_files import ensure_smollm2_folder

    rows = [json.loads(line) for line in (REPO / "recipes/data/prompts.jsonl").read_text().splitlines()]
    prompts = [({"prompt": r["prompt"]}, RESPONSES) for r in rows[:args.prompts]]
    comparisons = args.prompts * len(RESPONSES) * (len(RESPONSES) - 1) // 2
    server = LaunchedServer(ensure_smollm2_folder(), ServerLaunchConfig(args=["--served-model-name", "smollm2"]),
                            dtype=torch.float32, kv_cache_gib=1,
                            log_path=Path(tempfile.mkdtemp(prefix="judge-bench-")) / "vllm_server.log")
    try:
        judge_round(server.url, prompts[:2], 1)  # warm the server up
        seconds: dict[int, list[float]] = {c: [] for c in args.levels}
        judgments: dict[int, list[dict]] = {}
        for _ in range(args.repeats):
            for c in args.levels:
                records, s = judge_round(server.url, prompts, c)
                seconds[c].append(s)
                judgments.setdefault(c, records)
                print(json.dumps({"concurrency": c, "seconds": s, "comparisons": comparisons}), flush=True)
    finally:
        server.stop()
    serial = statistics.median(seconds[args.levels[0]])
    print(f"\n{args.prompts} prompts x {len(RESPONSES)} responses, {comparisons} comparisons per level, "
          f"median of {args.repeats}\n")
    print("| judge.concurrency | seconds | comparisons/s | × serial | judgments equal serial's |")
    print("|---:|---:|---:|---:|---|")
    for c in args.levels:
        s = statistics.median(seconds[c])
        same = sum(a == b for a, b in zip(judgments[c], judgments[args.levels[0]], strict=True))
        print(f"| {c} | {s:.1f} | {comparisons / s:.2f} | {serial / s:.2f}× | {same}/{len(prompts)} prompts |")


if __name__ == "__main__":
    main()
