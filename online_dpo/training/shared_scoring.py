"""Frozen scoring shared across processes: each scores its share of the sequences, all gather.

A round's reference log-probs and the held-out KL forwards are the same work on every process
when each process holds a whole frozen model: N processes would score everything N times.
Instead every process, given the same sequences, deals them the same way (prompt groups stay
together, so the packer still computes a shared prompt once), scores its own share, and the
values are gathered back into their original order. One process does about 1/N of the work.

Where the model's forward is collective (the FSDP2- or ZeRO-3-sharded policy scoring as the
reference, LoRA's sharded base as pi_0), every process must run as many forwards as the busiest:
the others pad with one-token forwards, so the collectives meet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from online_dpo.training.logprobs import Sequences, score_sequences
from online_dpo.training.packing import prompt_groups


@dataclass(frozen=True)
class SharedScores:
    values: torch.Tensor  # one summed log-prob per sequence, in the order given
    per_process: list[int]  # how many sequences each process scored


def deal(sizes: list[int], parts: int) -> list[list[int]]:
    """Item indices dealt into `parts` bins of about equal total size: largest item first, to the
    lightest bin (lowest index on a tie). Deterministic, so every process computes the same deal."""
    bins: list[list[int]] = [[] for _ in range(parts)]
    loads = [0] * parts
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        lightest = min(range(parts), key=lambda b: (loads[b], b))
        bins[lightest].append(i)
        loads[lightest] += sizes[i]
    return [sorted(b) for b in bins]


def shares(sequences: Sequences, world: int) -> list[list[int]]:
    """Each process's sequence indices; a prompt's sequences stay on one process."""
    groups = prompt_groups(sequences)
    tokens = [len(sequences[g[0]][0]) + sum(len(sequences[i][1]) for i in g) for g in groups]
    return [sorted(i for g in part for i in groups[g]) for part in deal(tokens, world)]


def score_shared(procs, model, sequences: Sequences, pad_id: int, device: torch.device, *,
                 padding_free: bool = True, collective: bool = False, batch_size: int = 8) -> SharedScores:
    """Every process calls this with the same `sequences` and gets every value back."""
    if procs.world == 1:
        values = score_sequences(model, sequences, pad_id, device, batch_size, padding_free=padding_free)
        return SharedScores(values, [len(sequences)])
    parts = shares(sequences, procs.world)
    mine = parts[procs.rank]
    forwards = max(math.ceil(len(p) / batch_size) for p in parts) if collective else 0
    values = score_sequences(model, [sequences[i] for i in mine], pad_id, device, batch_size,
                             padding_free=padding_free, min_forwards=forwards)
    gathered: list = [None] * procs.world
    torch.distributed.all_gather_object(gathered, values.tolist())
    out = torch.zeros(len(sequences))
    for part, part_values in zip(parts, gathered, strict=True):
        if part:
            out[part] = torch.tensor(part_values, dtype=out.dtype)
    return SharedScores(out, [len(v) for v in gathered])
