"""Held-out evaluation: sampling, win rate against a baseline, KL estimates, length and EOS.

Used by every round of a run and by `online-dpo eval`. Win rates are judged in both orders
(position bias becomes a tie) and ties count half: win_rate = (wins + ties / 2) / judged.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from judges.bias import BothOrders, judgments_in_flight
from judges.protocol import Preference, judge_hook
from judges.reliable import map_in_order
from online_dpo.analysis.statistics import bootstrap_mean, wilson
from online_dpo.sampling.generator import SamplingSettings
from online_dpo.training.logprobs import Sequences


def sample_records(models, generator, rows: list[dict], settings: SamplingSettings) -> tuple[list[dict], dict]:
    """Sample completions for prompt rows; records keep token ids and raw sampling log-probs."""
    prompt_ids = [models.prompt_ids(r["prompt"]) for r in rows]
    t0 = time.perf_counter()
    outputs = generator.generate(prompt_ids, settings)
    seconds = time.perf_counter() - t0
    records, tokens = [], 0
    for row, ids, completions in zip(rows, prompt_ids, outputs, strict=True):
        samples = []
        for c in completions:
            text = c.text or models.tokenizer.decode(c.token_ids, skip_special_tokens=True)
            tokens += len(c.token_ids)
            samples.append({"text": text, "token_ids": c.token_ids, "finished": c.finished,
                            "logp": float(sum(c.logprobs)), "num_tokens": len(c.token_ids),
                            "weight_version": c.weight_version})
        records.append({"row": row, "prompt_ids": ids, "samples": samples})
    return records, {"generation_seconds": seconds, "sampled_tokens": tokens,
                     "tokens_per_second": tokens / max(seconds, 1e-9)}


def kl_estimate(records: list[dict], score: Callable[[Sequences], torch.Tensor]) -> float:
    """Monte-Carlo KL(pi || model) = E_{y ~ pi}[log pi(y) - log model(y)], in nats per completion,
    where `score` gives the model's summed log-prob of each sequence. Valid only for samples drawn
    at temperature 1 with top_p 1 (true policy samples)."""
    sequences = [(r["prompt_ids"], s["token_ids"]) for r in records for s in r["samples"]]
    policy = torch.tensor([s["logp"] for r in records for s in r["samples"]])
    return (policy - score(sequences)).mean().item()


def sample_summary(records: list[dict], scorer) -> dict:
    """Mean judge score (with a bootstrap interval over prompts), length and EOS rate. Each
    sample's score is kept in the records as `eval_score` (None: the judge failed on it)."""
    samples = [s for r in records for s in r["samples"]]
    scores, per_prompt = [], []
    if scorer is not None:
        scorer.prefetch_scores([(r["row"], s["text"]) for r in records for s in r["samples"]])
        for r in records:
            values = [v for v, _ in scorer.score_many(r["row"], [s["text"] for s in r["samples"]])]
            for sample, v in zip(r["samples"], values, strict=True):
                sample["eval_score"] = v
            per_prompt.append(values)
            scores += [v for v in values if v is not None]
    interval = bootstrap_mean(per_prompt)
    # A judge's own held-out metrics (IFEval's prompt- and instruction-level accuracy), when it has some.
    metrics = judge_hook(scorer, "eval_metrics")
    extra = metrics([(r["row"], [s["text"] for s in r["samples"]]) for r in records]) if metrics else {}
    return {"judge_score": sum(scores) / len(scores) if scores else None,
            "judge_score_ci": interval.ci if interval else None,
            "mean_length": sum(s["num_tokens"] for s in samples) / len(samples),
            "eos_rate": sum(s["finished"] for s in samples) / len(samples), "judge_metrics": extra}


def win_rate(judge, policy: list[dict], baseline: list[dict]) -> dict:
    """Policy sample i of each prompt against baseline sample i of the same prompt."""
    judge = judge if isinstance(judge, BothOrders) else BothOrders(judge)
    outcomes = {Preference.FIRST: "wins", Preference.SECOND: "losses", Preference.TIE: "ties"}

    def prompt_counts(prompt: tuple[dict, dict]) -> dict[str, int]:
        p, b = prompt
        counts = dict.fromkeys(("wins", "losses", "ties", "failed"), 0)
        for ps, bs in zip(p["samples"], b["samples"], strict=False):
            counts[outcomes.get(judge.judge(p["row"], ps["text"], bs["text"]).preference, "failed")] += 1
        return counts

    # Each prompt's counts, for intervals and paired comparisons later; prompts judged at once as
    # in the judge step (judge.concurrency).
    in_flight = judgments_in_flight(judge, judge.concurrency)
    per_prompt = list(map_in_order(prompt_counts, list(zip(policy, baseline, strict=True)), in_flight))
    wins, losses, ties, failed = (sum(c[key] for c in per_prompt) for key in ("wins", "losses", "ties", "failed"))
    judged = wins + losses + ties
    interval = wilson(wins + ties / 2, judged)  # ties count half: see online_dpo.analysis.statistics.wilson
    return {"win_rate": (wins + ties / 2) / judged if judged else None,
            "win_rate_ci": interval.ci if interval else None,
            "tie_rate": ties / judged if judged else None,
            "wins": wins, "losses": losses, "ties": ties, "failed": failed, "per_prompt": per_prompt,
            "position_flip_rate": judge.pop_stats()["position_flip_rate"]}
