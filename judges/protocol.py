"""The judge protocol: what a judge is asked and the typed answer it gives.

A pairwise judge answers `judge(row, first, second) -> Judgment`; a pointwise judge answers
`score(row, completion) -> float`. `row` is the whole prompt row of the dataset (the `prompt`
string plus any metadata such as a gold answer), so verifiable-task judges need no side channel.
There are no sentinels: a failure is a `Judgment` with `Preference.FAILED` and a reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol, runtime_checkable

Row = dict[str, Any]


class Preference(str, Enum):
    FIRST = "first"
    SECOND = "second"
    TIE = "tie"
    FAILED = "failed"


@dataclass(frozen=True)
class Judgment:
    preference: Preference
    reason: str = ""
    first_score: float | None = None
    second_score: float | None = None

    @property
    def decided(self) -> bool:
        return self.preference in (Preference.FIRST, Preference.SECOND)


@runtime_checkable
class PairwiseJudge(Protocol):
    def judge(self, row: Row, first: str, second: str) -> Judgment: ...


@runtime_checkable
class PointwiseJudge(Protocol):
    def score(self, row: Row, completion: str) -> float: ...


class JudgeAnswerError(ValueError):
    """A judge answered something that is not a valid answer (NaN, wrong type, ...)."""


class JudgeConfigError(RuntimeError):
    """A judge fault that no retry can fix (a missing API key, HTTP 401/403, a wrong URL or model
    name): `ReliableJudge` re-raises it at once, so the run stops with this message."""


class JudgeRequestRejected(RuntimeError):
    """This one request was refused as malformed (HTTP 400, 422, ...): it is not retried and
    becomes a failed judgment with this message; the round's `judge.max_failure_rate` decides
    whether the run goes on (one over-long pair should not stop it; a judge that refuses every
    request does)."""


class JudgeRetryableError(RuntimeError):
    """A transient judge fault (HTTP 429 or 5xx, a refused connection, a timeout). `retry_after`
    (seconds, from the server's `Retry-After`) is the least time `ReliableJudge` waits before the
    next attempt; None leaves the wait to its exponential backoff."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def checked_score(judge: PointwiseJudge, row: Row, completion: str) -> float:
    value = judge.score(row, completion)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise JudgeAnswerError(f"score() returned {type(value).__name__} {value!r}, not a number")
    if not math.isfinite(value):
        raise JudgeAnswerError(f"score() returned non-finite {value!r}")
    return float(value)


def compare_scores(first: float, second: float, tie_margin: float = 0.0) -> Judgment:
    if abs(first - second) <= tie_margin:
        preference = Preference.TIE
    else:
        preference = Preference.FIRST if first > second else Preference.SECOND
    reason = f"scores {first:.4g} vs {second:.4g}"
    return Judgment(preference, reason, first, second)


def judge_hook(judge, name: str):
    """A judge's optional method (`check_rows`, `eval_metrics`), found through the layers that wrap
    it (each keeps the judge it wraps as `inner`); None when the judge has none."""
    while judge is not None:
        hook = getattr(type(judge), name, None)
        if callable(hook):
            return getattr(judge, name)
        judge = getattr(judge, "inner", None)
    return None


def innermost(judge):
    """The user's judge under the layers that wrap it."""
    while getattr(judge, "inner", None) is not None:
        judge = judge.inner
    return judge


class PointwiseAsPairwise:
    """Any pointwise judge is also a pairwise one: the higher score wins, equal scores tie."""

    def __init__(self, judge: PointwiseJudge, tie_margin: float = 0.0):
        self.inner = judge
        self.tie_margin = tie_margin

    def score(self, row: Row, completion: str) -> float:
        return checked_score(self.inner, row, completion)

    def judge(self, row: Row, first: str, second: str) -> Judgment:
        return compare_scores(self.score(row, first), self.score(row, second), self.tie_margin)

    def __getattr__(self, name: str):
        # A batched scorer (a reward model) stays batched behind this wrapper.
        if name == "score_batch":
            return getattr(self.inner, name)
        raise AttributeError(name)
