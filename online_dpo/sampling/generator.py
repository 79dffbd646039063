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
    weight_version: str | None = None
    """The label of the weights that sampled it (`Generator.label_weights`); None: unverified."""


class Generator(Protocol):
    weight_version: str | None
    """The label of the weights the engine holds, set once a probe proved them; None after a load."""

    def generate(
        self, prompt_ids: list[list[int]], settings: SamplingSettings
    ) -> list[list[Completion]]:
        """`settings.n` completions for each tokenized prompt."""

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the engine's weights in place with the trainer's (HF parameter names); the
        new weights are unlabelled until `label_weights`."""

    def release(self) -> None:
        """Free the engine's memory while the trainer trains (vLLM sleep mode on CUDA; a no-op for
        others). The next `load_weights` brings it back."""

    def label_weights(self, version: str) -> None:
        """Label the weights the engine holds (after the probe proved them); every completion
        sampled from now on carries the label."""

    def score(self, prompt_ids: list[int], completion_ids: list[int]) -> list[float]:
        """Per-token log-probs of `completion_ids` after `prompt_ids` under the engine's weights."""

    def close(self) -> None: ...
