"""Completion log-probs of (prompt, completion) token sequences: padded or packed batches.

One mask convention everywhere: a sequence is `(prompt_ids, completion_ids)` and only completion
tokens are scored; position t predicts token t+1. Training (`completion_logps`, with gradients),
frozen scoring (`score_sequences`), evaluation and the reference all go through here, so nothing
imports the trainer just to score sequences.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from online_dpo.training.distributed import reshard_root
from online_dpo.training.losses import token_logps
from online_dpo.training.packing import (
    PackingUnsupportedError,
    pack,
    packed_logps,
    prompt_groups,
    scored_token_logps,
)

Sequences = Sequence[tuple[list[int], list[int]]]


def collate(sequences: Sequences, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad (prompt, completion) token lists; the mask marks completion tokens only."""
    width = max(len(p) + len(c) for p, c in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    completion = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (prompt, comp) in enumerate(sequences):
        n = len(prompt) + len(comp)
        ids[row, :n] = torch.tensor(prompt + comp)
        attention[row, :n] = 1
        completion[row, len(prompt):n] = 1
    return {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}


def batch_logps(model, batch: dict[str, torch.Tensor], average: bool = False) -> torch.Tensor:
    """Summed (or mean) completion log-probs of a right-padded batch, one per row."""
    target = batch["completion_mask"][:, 1:].bool()  # position t predicts token t+1
    rows, cols = target.nonzero(as_tuple=True)
    index = rows * batch["input_ids"].shape[1] + cols
    per_token = scored_token_logps(model, batch["input_ids"], index, batch["input_ids"][:, 1:][target],
                                   attention_mask=batch["attention_mask"])
    summed = per_token.new_zeros(len(target)).index_add(0, rows, per_token)
    return summed / target.sum(-1).clamp(min=1) if average else summed


def completion_logps(model, sequences: Sequences, pad_id: int, device: torch.device,
                     padding_free: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs and completion lengths of sequences, in one forward pass."""
    if padding_free:
        return packed_logps(model, pack(sequences, pad_id).to(device))
    batch = {k: v.to(device) for k, v in collate(sequences, pad_id).items()}
    return batch_logps(model, batch), batch["completion_mask"][:, 1:].sum(-1)


@torch.no_grad()
def score_sequences(model, sequences: Sequences, pad_id: int, device: torch.device, batch_size: int = 8,
                    average: bool = False, padding_free: bool = True, min_forwards: int = 0) -> torch.Tensor:
    """Summed (or mean) completion log-probs of many sequences under a frozen model, in batches.
    `min_forwards`: one-token forwards follow until there were this many (a sharded model's
    forwards are collective, and a process with fewer batches must still join every one)."""
    # Sequences of one prompt (a pair's two sides, a prompt's samples) go into the same batch,
    # where the packer computes their prompt once.
    order = [i for group in prompt_groups(sequences) for i in group]
    out = torch.zeros(len(sequences))
    starts = range(0, len(order), batch_size)
    for start in starts:
        idx = order[start:start + batch_size]
        summed, lengths = completion_logps(model, [sequences[i] for i in idx], pad_id, device, padding_free)
        out[idx] = (summed / lengths.clamp(min=1) if average else summed).float().cpu()
    for _ in range(min_forwards - len(starts)):
        completion_logps(model, [([pad_id], [pad_id])], pad_id, device, padding_free)
    reshard_root(model)  # after the last forward alone: a resharded root would gather again
    return out


@torch.no_grad()
def check_packing(model, pad_id: int, device) -> float:
    """Packed and padded log-probs must agree, or the model lets packed sequences see each other
    (it ignores restarting position ids, or the shared-prompt mask)."""
    sequences = [([5, 6, 7], [8, 9, 10, 11, 20, 21]), ([12, 13], [14, 15]), ([16], [17, 18, 19]),
                 ([5, 6, 7], [22, 23, 24])]  # the last shares the first one's prompt
    batch = {k: v.to(device) for k, v in collate(sequences, pad_id).items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    padded = (token_logps(logits, batch["input_ids"]) * batch["completion_mask"][:, 1:]).sum(-1)
    diff = 0.0
    for share in (False, True):
        packed = pack(sequences, pad_id, share_prompts=share)
        assert packed.input_ids.shape[0] < 3 and (packed.attention_mask is not None) == share
        summed, _ = packed_logps(model, packed.to(device))
        diff = max(diff, (summed.float() - padded.float()).abs().max().item())
    # Rounding allowance: a bf16 model's sums differ by its precision; leaking attention, by far more.
    bound = 1e-3 + torch.finfo(logits.dtype).eps * padded.abs().max().item()
    if not diff < bound:
        raise PackingUnsupportedError(
            f"{type(model).__name__}: packed sequences change each other's log-probs (max diff "
            f"{diff:.3g}); this architecture (or attention implementation) does not isolate "
            "packed sequences by position ids or does not honour a 4D attention mask. "
            "Set train.padding_free=false."
        )
    return diff
