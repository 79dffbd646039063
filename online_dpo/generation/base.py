"""One small interface for sampling engines: vLLM and plain transformers both implement it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class SamplingSettings:
    n: int
    temperature: float
    top_p: float
    max_tokens: int
    seed: int


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    """Sampled tokens, including the EOS token when the completion ended on it."""
    logprobs: list[float]
    """Log-prob of each sampled token under the raw (untempered) policy distribution."""
    finished: bool
    """True when the completion ended on EOS rather than hitting max_tokens."""


class Generator(Protocol):
    def generate(
        self, prompt_ids: list[list[int]], settings: SamplingSettings
    ) -> list[list[Completion]]:
        """`settings.n` completions for each tokenized prompt."""

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the engine's weights in place with the trainer's (HF parameter names)."""

    def score(self, prompt_ids: list[int], completion_ids: list[int]) -> list[float]:
        """Per-token log-probs of `completion_ids` after `prompt_ids` under the engine's weights."""

    def close(self) -> None: ...
