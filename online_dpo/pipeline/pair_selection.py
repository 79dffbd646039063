"""Judge a prompt's samples and pick the training pair. Ties and failures are dropped and counted.

The judge passed in is a `judges.reliable.ReliableJudge` (optionally behind `BothOrders`): a
judge that raises, times out or answers garbage has already been retried and turned into a failed
judgment with its reason. A failure never decides a pair (TRL's online DPO gives ties to the
first sample; we don't).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from judges.bias import judgments_in_flight
from judges.protocol import Judgment, Preference
from judges.reliable import map_in_order
from online_dpo.data.offline_pairs import EXAMPLE_COLUMNS, PAIR_COLUMNS

KEPT, TIE, FAILED = "kept", "tie", "failed"


def judge_prompts(judge, prompts: list[tuple[dict, list[str]]], strategy: str, rng: random.Random,
                  max_length_ratio: float | None = None, concurrency: int = 1) -> Iterator[dict[str, Any]]:
    """`judge_samples` for each (row, texts), yielded in prompt order, with up to `concurrency`
    judge calls at once. A pairwise judge's round-robin comparisons are the units in flight, across
    prompts and within one, so a round of few prompts with many samples keeps the server as busy
    as a round of many. The random strategy's picks are drawn first, in prompt order, so the pairs
    do not depend on which judgment comes back first (judges.reliable.map_in_order)."""
    picks = [rng.sample(range(len(texts)), 2) if strategy == "random" else None for _, texts in prompts]
    # Judgments in flight, so that requests stay within `concurrency` (BothOrders sends two at once).
    concurrency = judgments_in_flight(judge, concurrency)
    if strategy != "random" and not getattr(judge, "pointwise", False):
        return _round_robin_prompts(judge, prompts, max_length_ratio, concurrency)

    def one(n: int) -> dict[str, Any]:
        row, texts = prompts[n]
        return judge_samples(judge, row, texts, strategy, picks[n], max_length_ratio)

    return map_in_order(one, range(len(prompts)), concurrency)


def _round_robin_prompts(judge, prompts, max_length_ratio, concurrency) -> Iterator[dict[str, Any]]:
    units = [(n, i, j) for n, (_, texts) in enumerate(prompts)
             for i in range(len(texts)) for j in range(i + 1, len(texts))]

    def compare(unit) -> Judgment:
        n, i, j = unit
        row, texts = prompts[n]
        return judge.judge(row, texts[i], texts[j])

    judgments = map_in_order(compare, units, concurrency)
    start = 0
    for _, texts in prompts:
        count = len(texts) * (len(texts) - 1) // 2
        comparisons = [(i, j, next(judgments)) for _, i, j in units[start:start + count]]
        start += count
        yield _length_control(_round_robin_record(len(texts), comparisons), texts, max_length_ratio)
def judge_samples(judge, row: dict, texts: list[str], strategy: str, pick: list[int] | None = None,
                  max_length_ratio: float | None = None) -> dict[str, Any]:
    """A record: per-sample scores (pointwise judges), the comparisons made, and the pair.

    `pick` is the random strategy's pair of sample indices (`judge_prompts` draws them).
    `max_length_ratio` is a length control: a winner more than that many times longer (in words)
    than the loser is called a tie instead of teaching the policy that longer is better.
    """
    if strategy == "random":
        i, j = pick
        judgment = judge.judge(row, texts[i], texts[j])
        record = _record(None, [(i, j, judgment)], i, j, judgment)
    elif getattr(judge, "pointwise", False):
        record = _best_vs_worst_pointwise(judge, row, texts)
    else:
        comparisons = [(i, j, judge.judge(row, texts[i], texts[j]))
                       for i in range(len(texts)) for j in range(i + 1, len(texts))]
        record = _round_robin_record(len(texts), comparisons)
    return _length_control(record, texts, max_length_ratio)


def _length_control(record: dict[str, Any], texts: list[str], max_length_ratio: float | None) -> dict[str, Any]:
    if record["status"] == KEPT and max_length_ratio is not None:
        chosen, rejected = (len(texts[record[k]].split()) for k in ("chosen", "rejected"))
        if chosen > max_length_ratio * max(rejected, 1):
            record.update(status=TIE, chosen=None, rejected=None,
                          reason=f"length control: winner has {chosen} words vs {rejected}")
    return record


def _best_vs_worst_pointwise(judge, row, texts) -> dict[str, Any]:
    results = judge.score_many(row, texts)
    scores = [s for s, _ in results]
    valid = [k for k, s in enumerate(scores) if s is not None]
    if len(valid) < 2:
        reasons = "; ".join(sorted({r for _, r in results if r}))
        judgment = Judgment(Preference.FAILED, f"fewer than 2 samples scored: {reasons}")
        return _record(scores, [], None, None, judgment)
    best = max(valid, key=lambda k: scores[k])
    worst = min(valid, key=lambda k: scores[k])
    if scores[best] == scores[worst]:
        judgment = Judgment(Preference.TIE, f"all scores equal ({scores[best]:.4g})")
    else:
        judgment = Judgment(Preference.FIRST, f"best {scores[best]:.4g} vs worst {scores[worst]:.4g}",
                            scores[best], scores[worst])
    return _record(scores, [], best, worst, judgment)


def _round_robin_record(n: int, comparisons: list[tuple[int, int, Judgment]]) -> dict[str, Any]:
    """Best vs worst of n samples by wins over every (i, j) comparison, if their direct comparison agrees."""
    wins = [0.0] * n
    for i, j, judgment in comparisons:
        if judgment.preference == Preference.FIRST:
            wins[i] += 1
        elif judgment.preference == Preference.SECOND:
            wins[j] += 1
    if all(c[2].preference == Preference.FAILED for c in comparisons):
        return _record(None, comparisons, None, None,
                       Judgment(Preference.FAILED, comparisons[0][2].reason))
    best = max(range(n), key=lambda k: wins[k])
    worst = min(range(n), key=lambda k: wins[k])
    direct = next(c[2] for c in comparisons if {c[0], c[1]} == {best, worst}) if best != worst else None
    if direct is None or not direct.decided:
        reason = direct.reason if direct else "no sample won more often than another"
        preference = direct.preference if direct and direct.preference == Preference.FAILED else Preference.TIE
        return _record(None, comparisons, best, worst, Judgment(preference, reason))
    # The direct comparison must agree with the ranking, or the pair is not trustworthy.
    winner = best if (direct.preference == Preference.FIRST) == (best < worst) else worst
    if winner != best:
        return _record(None, comparisons, best, worst,
                       Judgment(Preference.TIE, "ranking and direct comparison disagree"))
    return _record(None, comparisons, best, worst, Judgment(Preference.FIRST, direct.reason))


def _record(scores, comparisons, first, second, judgment: Judgment) -> dict[str, Any]:
    """`chosen`/`rejected` are sample indices when the judgment is decided, else None."""
    if judgment.preference == Preference.FAILED:
        status = FAILED
    elif judgment.decided:
        status = KEPT
    else:
        status = TIE
    chosen = rejected = None
    if status == KEPT:
        chosen, rejected = (first, second) if judgment.preference == Preference.FIRST else (second, first)
    return {
        "scores": scores,
        "comparisons": [
            {"first": i, "second": j, "preference": c.preference.value, "reason": c.reason}
            for i, j, c in comparisons
        ],
        "status": status,
        "reason": judgment.reason,
        "chosen": chosen,
        "rejected": rejected,
    }


def _messages(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def pair_columns(records: list[dict], judgments: list[dict], sampler_round: int) -> dict[str, list]:
    """A round's decided pairs as dataset columns (TRL's conversational prompt/chosen/rejected,
    plus token ids and the sampler's log-probs, which are the reference's when it sampled)."""
    columns: dict[str, list] = {c: [] for c in PAIR_COLUMNS}
    for rec, j in zip(records, judgments, strict=True):
        if j["status"] != KEPT:
            continue
        columns["prompt"].append(_messages(rec["row"]["prompt"]))
        for side in ("chosen", "rejected"):
            sample = rec["samples"][j[side]]
            columns[side].append([{"role": "assistant", "content": sample["text"]}])
            columns[f"{side}_ids"].append(sample["token_ids"])
            columns[f"{side}_sample_logp"].append(sample["logp"])
        columns["prompt_ids"].append(rec["prompt_ids"])
        columns["sampler_round"].append(sampler_round)
        columns["replay"].append(False)
        columns["reason"].append(j["reason"])
        columns["prompt_index"].append(rec["prompt_index"])
    return columns


def example_columns(records: list[dict], judgments: list[dict], sampler_round: int,
                    threshold: float | None) -> dict[str, list]:
    """KTO: every scored sample is an example, desirable at or above `threshold`, or, without
    one, above its prompt's mean score (samples exactly at the mean are dropped)."""
    columns: dict[str, list] = {c: [] for c in EXAMPLE_COLUMNS}
    for rec, j in zip(records, judgments, strict=True):
        scored = [(s, v) for s, v in zip(rec["samples"], j["scores"] or [], strict=False) if v is not None]
        if not scored:
            continue
        cut = threshold if threshold is not None else sum(v for _, v in scored) / len(scored)
        for sample, score in scored:
            if threshold is None and score == cut:
                continue
            columns["prompt"].append(_messages(rec["row"]["prompt"]))
            columns["completion"].append([{"role": "assistant", "content": sample["text"]}])
            columns["label"].append(score >= cut)
            columns["prompt_ids"].append(rec["prompt_ids"])
            columns["completion_ids"].append(sample["token_ids"])
            columns["sample_logp"].append(sample["logp"])
            columns["sampler_round"].append(sampler_round)
            columns["score"].append(score)
            columns["prompt_index"].append(rec["prompt_index"])
    return columns
