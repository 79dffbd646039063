"""Per-prompt values from a run's files, a round's intervals, and the gaming alarm.

Where the per-prompt values live:
- round_<k>/judgments.jsonl: the training judge's `scores` of each prompt's samples (pointwise
  judges; a pairwise judge gives no scores, hence no judge score and no interval);
- round_<k>/eval_samples.jsonl and round_0/pi0_eval_samples.jsonl: each held-out sample's
  `eval_score` (the eval judge's), and per prompt `vs_pi0` = {wins, losses, ties, failed} of the
  round's samples against pi_0's.

The gaming alarm (`gaming_alarm`). After an evaluated round k >= 2 it fires when the training judge
is pleased while held-out quality drops, i.e. when both
  (a) the training judge's mean score rose significantly since round 1: the 95% interval of
      score(k) - score(1), an unpaired bootstrap over each round's prompts, lies above 0; and
  (b) held-out quality fell significantly against pi_0 on the same held-out prompts:
      the 95% interval of the paired difference eval_score(k) - eval_score(pi_0) lies below 0,
      or the win rate against pi_0 has its 95% (Wilson) interval below 0.5.
A policy that climbs its training judge while losing to where it started is exploiting that judge.
"""

from __future__ import annotations

import json
from pathlib import Path

from online_dpo.analysis.statistics import (
    Interval,
    bootstrap_mean,
    paired_bootstrap_diff,
    unpaired_bootstrap_diff,
)
from online_dpo.storage.artifacts import read_jsonl

OUTCOME_VALUE = {"wins": 1.0, "ties": 0.5, "losses": 0.0}  # a failed comparison has no value


def judge_score_groups(round_dir: Path) -> list[list] | None:
    """The training judge's scores of the round's samples, per prompt; None without scores."""
    path = Path(round_dir) / "judgments.jsonl"
    if not path.exists():
        return None
    groups = [j.get("scores") or [] for j in read_jsonl(path)]
    return groups if any(v is not None for g in groups for v in g) else None


def _records(path: Path) -> list[dict] | None:
    return read_jsonl(path) if Path(path).exists() else None


def eval_score_groups(records: list[dict] | None) -> list[list] | None:
    """Each held-out prompt's sample eval scores; None when the samples carry none (older runs)."""
    if not records or any("eval_score" not in s for r in records for s in r["samples"]):
        return None
    return [[s["eval_score"] for s in r["samples"]] for r in records]


def win_groups(records: list[dict] | None) -> list[list] | None:
    """Each held-out prompt's comparisons against pi_0 as 1 (win), 0.5 (tie), 0 (loss); their mean
    over all prompts is the win rate. None when the records carry no `vs_pi0`."""
    if not records or any("vs_pi0" not in r for r in records):
        return None
    return [outcome_values(r["vs_pi0"]) for r in records]


def outcome_values(counts: dict) -> list[float]:
    """One prompt's {wins, losses, ties, failed} as comparison values: 1, 0 and 0.5 (no failed)."""
    return [value for key, value in OUTCOME_VALUE.items() for _ in range(counts[key])]


def prompt_keys(records: list[dict]) -> list[str]:
    """What identifies a held-out prompt across runs: the prompt itself."""
    return [json.dumps(r["row"]["prompt"], sort_keys=True) for r in records]


def as_interval(value, ci) -> Interval | None:
    return Interval(value, ci[0], ci[1]) if value is not None and ci else None


def gaming_alarm(k: int, judge_rise: Interval | None, eval_vs_pi0: Interval | None,
                 win_vs_pi0: Interval | None) -> dict | None:
    """The rule (module docstring), on the three intervals; None when it does not fire."""
    if k < 2 or judge_rise is None or not judge_rise.above(0):
        return None
    reasons = []
    if eval_vs_pi0 is not None and eval_vs_pi0.below(0):
        reasons.append("held-out eval score fell against pi_0")
    if win_vs_pi0 is not None and win_vs_pi0.below(0.5):
        reasons.append("win rate against pi_0 below 0.5")
    if not reasons:
        return None
    alarm = {"round": k, "reasons": reasons,
             "judge_score_rise_since_round_1": judge_rise.value, "judge_score_rise_ci": judge_rise.ci}
    if eval_vs_pi0 is not None:
        alarm.update(eval_score_vs_pi0=eval_vs_pi0.value, eval_score_vs_pi0_ci=eval_vs_pi0.ci)
    if win_vs_pi0 is not None:
        alarm.update(win_rate_vs_pi0=win_vs_pi0.value, win_rate_vs_pi0_ci=win_vs_pi0.ci)
    return alarm


def gaming_check(k: int, train_now: list, train_first: list, eval_now: list | None,
                 eval_pi0: list | None, win_vs_pi0: Interval | None) -> dict | None:
    """The alarm from per-prompt values: training judge scores of rounds k and 1, held-out eval
    scores of round k and pi_0 on the same prompts (paired), and the win-rate interval."""
    rise = unpaired_bootstrap_diff(train_now, train_first)
    drop = paired_bootstrap_diff(eval_now, eval_pi0) if eval_now is not None and eval_pi0 is not None else None
    return gaming_alarm(k, rise, drop, win_vs_pi0)


def alarm_message(alarm: dict) -> str:
    def iv(value, ci):
        return f"{value:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]"

    parts = [f"training judge score rose {iv(alarm['judge_score_rise_since_round_1'], alarm['judge_score_rise_ci'])} "
             "since round 1"]
    if "eval_score_vs_pi0" in alarm:
        parts.append(f"held-out eval score vs pi_0 {iv(alarm['eval_score_vs_pi0'], alarm['eval_score_vs_pi0_ci'])}")
    if "win_rate_vs_pi0" in alarm:
        lo, hi = alarm["win_rate_vs_pi0_ci"]
        parts.append(f"win rate vs pi_0 {alarm['win_rate_vs_pi0']:.3f} [{lo:.3f}, {hi:.3f}]")
    return (f"WARNING: gaming alarm at round {alarm['round']}: " + "; ".join(parts)
            + f" ({'; '.join(alarm['reasons'])}): the policy may be exploiting the training judge")


def round_intervals(run_dir: Path, k: int, metrics: dict) -> dict:
    """What round_metrics adds: judge_score_ci, eval_score_vs_pi0 (+ _ci, paired on the held-out
    prompts) and gaming_alarm when the rule fires. `metrics` holds the round's other metrics."""
    run_dir = Path(run_dir)
    out = {}
    train_now = judge_score_groups(run_dir / f"round_{k}")
    if train_now is not None:
        interval = bootstrap_mean(train_now)
        out["judge_score_ci"] = interval.ci if interval else None
    eval_path = run_dir / f"round_{k}" / "eval_samples.jsonl"
    if not eval_path.exists():  # written by evaluated rounds only
        return out
    now, pi0 = _records(eval_path), _records(run_dir / "round_0" / "pi0_eval_samples.jsonl")
    eval_now, eval_pi0 = eval_score_groups(now), eval_score_groups(pi0)
    if eval_pi0 is not None and prompt_keys(now) != prompt_keys(pi0):
        eval_pi0 = None  # not the same held-out prompts: nothing to pair with
    if eval_now is not None and eval_pi0 is not None:
        drop = paired_bootstrap_diff(eval_now, eval_pi0)
        if drop is not None:
            out.update(eval_score_vs_pi0=drop.value, eval_score_vs_pi0_ci=drop.ci)
    train_first = judge_score_groups(run_dir / "round_1")
    if k >= 2 and train_now is not None and train_first is not None:
        win = as_interval(metrics.get("win_rate_vs_pi0"), metrics.get("win_rate_vs_pi0_ci"))
        alarm = gaming_check(k, train_now, train_first, eval_now, eval_pi0, win)
        if alarm is not None:
            out["gaming_alarm"] = alarm
    return out

