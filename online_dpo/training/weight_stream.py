"""The policy's whole weights as a stream of (name, tensor), never as a whole state dict per process.

Every weight movement reads the policy through here: the sampler sync (in-process engine, an
engine per process, server files) and the checkpoint. Under FSDP2 each parameter is gathered on
its own (`full_tensor`, an all-gather every process joins, in the same order) and dropped once the
consumer has it; under ZeRO-3 each parameter is gathered inside its own `GatheredParameters`. So a
process holds its shard plus one whole parameter, or one bucket where the consumer groups them
(`buckets`: a server's transfer files, checkpoint shards). Replicated training yields the
module's own tensors, which costs nothing. Under LoRA each adapted layer is merged as it is
yielded, so no merged copy of the model exists. A tied name (lm_head = the embeddings) is left
out before anything is gathered: each tensor moves once, and every consumer re-ties it (vLLM and
transformers do on load).

A consumer on a process that does not need the weights must still drain a sharded stream
(`drain`), or the others wait in a gather forever.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from online_dpo.training.distributed import is_sharded, uses_deepspeed, whole_tensor, zero_stage
from online_dpo.training.lora import merged_weights

Stream = Iterator[tuple[str, torch.Tensor]]


def full_weights(accelerator, model, lora: bool = False) -> Stream:
    """Whole tensors of `model` (the policy, wrapped or not), one at a time, under their HF names,
    tied names left out."""
    module = accelerator.unwrap_model(model)  # ZeRO-3: the engine's module; FSDP2 shards in place
    if lora:  # replicated or FSDP2 (compat refuses LoRA under DeepSpeed)
        return merged_weights(module, skip=tied_names(module.get_base_model()))
    tied = tied_names(module)
    if zero_stage(accelerator) == 3:
        return _zero3(module, tied)
    if is_sharded(accelerator) and not uses_deepspeed(accelerator):
        return _fsdp2(module, tied)
    # Replicated, or ZeRO-1/2: the module holds the whole, current weights.
    return ((name, value) for name, value in module.state_dict().items() if name not in tied)


def _fsdp2(module, skip: set[str]) -> Stream:
    for name, value in module.state_dict().items():
        if name not in skip:
            yield name, whole_tensor(value)


def _zero3(module, skip: set[str]) -> Stream:
    import deepspeed

    params = dict(module.named_parameters(remove_duplicate=False))
    for name, value in module.state_dict().items():
        param = params.get(name)
        if name in skip:
            continue
        if param is None:  # a buffer: never partitioned
            yield name, value
            continue
        # modifier_rank None: read-only; the clone outlives the context, which frees the gather.
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            yield name, param.detach().clone()


def drain(stream: Iterable) -> None:
    for _ in stream:
        pass


def buckets(stream: Stream, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive groups of at most `bucket_bytes` (a larger tensor is a group of its own)."""
    group, size = [], 0
    for name, tensor in stream:
        nbytes = tensor.numel() * tensor.element_size()
        if group and size + nbytes > bucket_bytes:
            yield group
            group, size = [], 0
        group.append((name, tensor))
        size += nbytes
    if group:
        yield group


def tied_names(model) -> set[str]:
    """Parameter names that repeat an earlier name's parameter (lm_head tied to the embeddings),
    by identity, so it holds for sharded and partitioned parameters too, with nothing gathered."""
    seen, tied = set(), set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        seen.add(id(param))
    return tied


class Counted:
    """A stream that counts what passes: tensors and bytes."""

    def __init__(self, stream: Stream):
        self.stream, self.tensors, self.bytes = stream, 0, 0

    def __iter__(self) -> Stream:
        for name, tensor in self.stream:
            self.tensors += 1
            self.bytes += tensor.numel() * tensor.element_size()
            yield name, tensor
