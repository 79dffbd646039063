"""Deterministic rule-based judges with explicit scoring functions."""

from __future__ import annotations

import re

_SENTENCE_END = re.compile(r"[.!?)\"']\s*$")


class ConciseAnswerJudge:
    """Rewards short answers that end cleanly: a target style a 135M model learns in a few rounds.

    score = brevity + ending, in [0, 2]:
      brevity = max(0, 1 - words / max_words)   (1.0 for an empty-ish answer, 0 at max_words)
      ending  = 1 if the text ends a sentence (., !, ?, a closing bracket or quote), else 0
    A completion cut off by max_tokens rarely ends a sentence, so the rule also rewards stopping.
    An empty answer scores 0: brevity is only worth something with content.
    """

    def __init__(self, max_words: int = 60, min_words: int = 3):
        if max_words <= min_words:
            raise ValueError(f"max_words ({max_words}) must exceed min_words ({min_words})")
        self.max_words = max_words
        self.min_words = min_words

    def score(self, row: dict, completion: str) -> float:
        words = len(completion.split())
        if words < self.min_words:
            return 0.0
        brevity = max(0.0, 1.0 - words / self.max_words)
        ending = 1.0 if _SENTENCE_END.search(completion) else 0.0
        return brevity + ending
