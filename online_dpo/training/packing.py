"""Padding-free batches: sequences bin-packed into rows, completions of one prompt sharing it.

A right-padded batch is as wide as its longest sequence in every row; on recorded rounds 18-26%
of the padded tokens were padding. Packing first-fit-decreasing into rows up to twice the
longest group drops most of it. Wider rows would not pay on CPU: the attention kernel computes
every query against the whole row under the mask, and for SmolLM2-135M each extra 100 tokens
of row width adds ~2.6% to a token's cost.

Sequences with the same prompt (a pair's chosen and rejected, a prompt's samples) form one
group laid out as [prompt, completion 1, completion 2, ...]: the prompt is computed once, each
completion's positions continue from the prompt's end, and a 4D mask lets a completion see the
prompt and itself but never a sibling. A chat-templated prompt is a third of a pair's tokens at
the quickstart's shape, so this removes about a fifth of a pair's compute.

Without shared prompts the batch carries no mask: with restarting position ids transformers
builds the block-causal mask itself, so a token never attends across sequences.
`online_dpo.training.logprobs.check_packing` proves both layouts once per model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from online_dpo.training.chunked_logps import VOCAB_CHUNK, chunked_token_logps

# Names the packed layout in the reference-log-prob cache key: a layout change changes the sums
# in their last bits.
HEAD = f"head at scored positions in {VOCAB_CHUNK}-entry vocabulary chunks"
LAYOUT = f"rows-2x-ffd, shared-prompt groups, {HEAD}"


class PackingUnsupportedError(RuntimeError):
    pass


@dataclass(frozen=True)
class PackedBatch:
    input_ids: torch.Tensor  # (rows, width)
    position_ids: torch.Tensor  # (rows, width); a group's prompt starts at 0, each completion follows it
    attention_mask: torch.Tensor | None  # (rows, 1, width, width) bool, True = may attend; None = no shared prompt
    score_index: torch.Tensor  # (K,) flat index into rows*width of the position predicting a scored token
    score_label: torch.Tensor  # (K,) the scored (completion) token
    score_owner: torch.Tensor  # (K,) index of the sequence it belongs to
    count: int  # sequences in the batch

    def to(self, device) -> PackedBatch:
        mask = None if self.attention_mask is None else self.attention_mask.to(device)
        return PackedBatch(self.input_ids.to(device), self.position_ids.to(device), mask,
                           self.score_index.to(device), self.score_label.to(device),
                           self.score_owner.to(device), self.count)


def assign_rows(lengths: Sequence[int], width: int) -> list[list[int]]:
    """First-fit decreasing into rows of `width` tokens (at least the longest sequence)."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, space in enumerate(free):
            if lengths[i] <= space:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(width - lengths[i])
    return rows


def prompt_groups(sequences: Sequence[tuple[list[int], list[int]]]) -> list[list[int]]:
    """Indices of sequences grouped by identical prompt, in order of first appearance."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (prompt, _) in enumerate(sequences):
        groups.setdefault(tuple(prompt), []).append(i)
    return list(groups.values())


def pack(sequences: Sequence[tuple[list[int], list[int]]], pad_id: int, row_factor: float = 2.0,
         share_prompts: bool = True) -> PackedBatch:
    """(prompt, completion) token lists -> packed rows; every completion token is scored."""
    if any(not prompt for prompt, _ in sequences):
        raise ValueError("every sequence needs a non-empty prompt: its last token predicts the first "
                         "completion token")
    groups = prompt_groups(sequences) if share_prompts else [[i] for i in range(len(sequences))]
    lengths = [len(sequences[g[0]][0]) + sum(len(sequences[i][1]) for i in g) for g in groups]
    rows = assign_rows(lengths, int(row_factor * max(lengths)))
    width = max(sum(lengths[g] for g in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    # Per token: its group (-1: the row's tail) and its branch within the group (0: the prompt).
    group_of = torch.full((len(rows), width), -1, dtype=torch.long)
    branch = torch.zeros((len(rows), width), dtype=torch.long)
    index, label, owner = [], [], []
    for r, members in enumerate(rows):
        col = 0
        for g in members:
            prompt = sequences[groups[g][0]][0]
            p_end = col + len(prompt)
            ids[r, col:p_end] = torch.tensor(prompt)
            positions[r, col:p_end] = torch.arange(len(prompt))
            group_of[r, col:p_end] = g
            col = p_end
            for b, i in enumerate(groups[g], start=1):
                completion = sequences[i][1]
                end = col + len(completion)
                ids[r, col:end] = torch.tensor(completion, dtype=torch.long)
                positions[r, col:end] = torch.arange(len(prompt), len(prompt) + len(completion))
                group_of[r, col:end] = g
                branch[r, col:end] = b
                # The first token is predicted by the prompt's last position, the rest by their
                # predecessor in the completion.
                if completion:
                    index += [r * width + p_end - 1] + [r * width + t for t in range(col, end - 1)]
                label += completion
                owner += [i] * len(completion)
                col = end
        # The tail restarts its positions too: it is a block of its own that no real token sees.
        positions[r, col:] = torch.arange(width - col)
    mask = None
    if len(groups) < len(sequences):
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        same_group = group_of.unsqueeze(2) == group_of.unsqueeze(1)
        visible_branch = (branch.unsqueeze(1) == 0) | (branch.unsqueeze(2) == branch.unsqueeze(1))
        mask = (same_group & visible_branch & causal).unsqueeze(1)
    return PackedBatch(ids, positions, mask, torch.tensor(index, dtype=torch.long),
                       torch.tensor(label, dtype=torch.long), torch.tensor(owner, dtype=torch.long),
                       len(sequences))


def output_head(model) -> torch.nn.Module:
    """The LM head (vocabulary projection) inside DDP / peft wrappers."""
    while hasattr(model, "module"):  # DistributedDataParallel
        model = model.module
    return model.get_output_embeddings()


def scored_token_logps(model, input_ids: torch.Tensor, index: torch.Tensor, labels: torch.Tensor,
                       vocab_chunk: int | None = VOCAB_CHUNK, **forward) -> torch.Tensor:
    """Log-probs (K,) of labels[j] under the logits at flat position index[j] of input_ids.

    The LM head and the softmax run only at those positions. The head is a (hidden x vocabulary)
    matmul at every position, a fifth of SmolLM2's FLOPs, plus a softmax over 49k entries;
    prompt and padding positions need neither. A pre-hook selects the positions inside the
    model's own forward, so DDP's and FSDP's hooks still see one ordinary forward call, and a
    linear head is run in vocabulary chunks (online_dpo/training/chunked_logps.py), so no
    (K x V) logits tensor is ever held: the model's `logits` output is the (K, 1) log-probs.
    `vocab_chunk=None` computes whole float32 logits (the path before chunking, for benchmarks).
    """
    head = output_head(model)

    def select(_module, args):
        return (args[0].flatten(0, 1)[index], *args[1:])

    def chunked_head(hidden):
        return chunked_token_logps(hidden, head, labels, vocab_chunk).unsqueeze(-1)

    # A wrapped head (e.g. a LoRA layer) computes whole logits.
    chunked = vocab_chunk is not None and type(head) is torch.nn.Linear
    handle = head.register_forward_pre_hook(select)
    if chunked:
        head.forward = chunked_head  # an instance attribute: nn.Module.__call__ (and its hooks) call it
    try:
        # use_cache=False matters: with a KV cache, transformers ignores the packing and lets
        # sequences of a row attend to each other.
        out = model(input_ids=input_ids, use_cache=False, **forward).logits.float()
    finally:
        handle.remove()
        if chunked:
            del head.forward
    if chunked:
        return out.squeeze(-1)
    return out.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(out, dim=-1)


def packed_logps(model, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs (count,) and completion lengths (count,) of a packed batch."""
    forward = {"position_ids": batch.position_ids}
    if batch.attention_mask is not None:
        forward["attention_mask"] = batch.attention_mask
    per_token = scored_token_logps(model, batch.input_ids, batch.score_index, batch.score_label, **forward)
    summed = per_token.new_zeros(batch.count).index_add(0, batch.score_owner, per_token)
    return summed, torch.bincount(batch.score_owner, minlength=batch.count)
