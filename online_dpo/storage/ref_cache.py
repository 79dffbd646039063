"""Reference log-probs of pi_0, cached across runs.

A sweep over beta, loss types or schedules on one offline dataset scores the same sequences
under the same frozen pi_0 every time. The cache key holds everything that changes the number:
the bytes of the model's weight and config files, the scoring dtype and device type, padding-free
or padded batches, the torch and transformers versions, and the token ids themselves.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import transformers

from online_dpo.storage.jsonl_store import JsonlStore
from online_dpo.storage.model_files import cache_root
from online_dpo.training.packing import HEAD, LAYOUT

Sequences = Sequence[tuple[list[int], list[int]]]


def model_fingerprint(model_dir: Path, *, dtype: torch.dtype, device: str, padding_free: bool) -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in Path(model_dir).iterdir()
                   if p.suffix in (".safetensors", ".bin") or p.name == "config.json")
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    layout = LAYOUT if padding_free else f"padded, {HEAD}"
    digest.update(f"{dtype}|{device}|{layout}|{torch.__version__}|{transformers.__version__}".encode())
    return digest.hexdigest()[:24]


def sequence_key(prompt_ids: list[int], completion_ids: list[int]) -> str:
    return hashlib.sha256(json.dumps([prompt_ids, completion_ids]).encode()).hexdigest()[:32]


class ReferenceLogpCache:
    """Summed completion log-probs under one model fingerprint, in an append-only jsonl file."""

    def __init__(self, fingerprint: str, root: Path | None = None):
        root = root or Path(os.environ.get("ONLINE_DPO_REFERENCE_CACHE", cache_root() / "reference_logps"))
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / f"{fingerprint}.jsonl"
        self.store = JsonlStore(self.path, value_field="logp")

    def lookup(self, sequences: Sequences) -> tuple[torch.Tensor, list[int]]:
        """(cached values, 0 where missing; the missing indices)."""
        keys = [sequence_key(p, c) for p, c in sequences]
        missing = [i for i, k in enumerate(keys) if k not in self.store]
        return torch.tensor([float(self.store.get(k, 0.0)) for k in keys], dtype=torch.float32), missing

    def put(self, sequences: Sequences, values: torch.Tensor) -> None:
        self.store.put_many((sequence_key(p, c), v) for (p, c), v in zip(sequences, values.tolist(), strict=True))

    def score(self, sequences: Sequences, compute: Callable[[Sequences], torch.Tensor]) -> tuple[torch.Tensor, int]:
        """Cached values where present, `compute` for the rest (then stored); returns (logps, hits)."""
        out, missing = self.lookup(sequences)
        if missing:
            fresh = compute([sequences[i] for i in missing])
            out[missing] = fresh
            self.put([sequences[i] for i in missing], fresh)
        return out, len(sequences) - len(missing)
