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
