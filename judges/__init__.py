"""Judges: the pairwise/pointwise protocol and built-in judges."""

from judges.protocol import (
    Judgment,
    PairwiseJudge,
    PointwiseAsPairwise,
    PointwiseJudge,
    Preference,
)

__all__ = ["Judgment", "PairwiseJudge", "PointwiseAsPairwise", "PointwiseJudge", "Preference"]
