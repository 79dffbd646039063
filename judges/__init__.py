"""Judges: the pairwise/pointwise protocol and built-in judges."""

from judges.protocol import (
    JudgeConfigError,
    JudgeRequestRejected,
    JudgeRetryableError,
    Judgment,
    PairwiseJudge,
    PointwiseAsPairwise,
    PointwiseJudge,
    Preference,
)

__all__ = ["JudgeConfigError", "JudgeRequestRejected", "JudgeRetryableError", "Judgment",
           "PairwiseJudge", "PointwiseAsPairwise", "PointwiseJudge", "Preference"]
