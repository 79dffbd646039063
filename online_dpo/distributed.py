"""Process roles when a run is launched with several processes (`accelerate launch`, `torchrun`).

Process 0 owns the sampler, the judges and every artifact; all processes train, each on its own
share of a step's pairs, with gradients averaged (DDP or FSDP2). Decisions that depend on the run
directory are taken by process 0 and broadcast, so no process can race ahead of another.

Under FSDP2 the policy's weights are sharded, so reading them whole (sampler sync, reference
swap, checkpoint) and running it forward (the sync probe) are collective: every process joins.
"""

from __future__ import annotations

import os

import torch
from accelerate import PartialState
from accelerate.utils import DistributedType, broadcast_object_list

# Every process holds whole models: syncing the sampler and swapping the reference gather nothing.
REPLICATED = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)


class Processes:
    def __init__(self):
        self.state = PartialState(cpu=not torch.cuda.is_available())
        self.main = self.state.is_main_process
        self.world = self.state.num_processes

    def agree(self, value):
        """Process 0's value, on every process."""
        if self.world == 1:
            return value
        box = [value]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            self.state.wait_for_everyone()


def is_sharded(accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def check_supported(accelerator, recipe) -> None:
    kind = accelerator.distributed_type
    if kind in REPLICATED:
        asked_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
        if asked_fsdp and accelerator.is_main_process:
            print(f"[online-dpo] warning: accelerate runs FSDP on accelerators only; this run is "
                  f"{kind.value} (weights not sharded)", flush=True)
        return
    if kind == DistributedType.FSDP:
        if accelerator.state.fsdp_plugin.fsdp_version != 2:
            raise RuntimeError("FSDP1 is not supported: set fsdp_version: 2 in the accelerate config "
                               "(recipes/accelerate/fsdp.yaml)")
        if recipe.train.lora is not None:
            raise RuntimeError("train.lora with FSDP is not supported; LoRA already keeps one model "
                               "copy: launch it with recipes/accelerate/ddp.yaml")
        if recipe.reference.schedule == "ema":
            raise RuntimeError("reference.schedule: ema with FSDP is not supported (the EMA update "
                               "reads the sharded policy on one process); use fixed or swap")
        return
    # accelerate's DeepSpeed backward steps the engine after every micro-batch unless its own
    # accumulation drives the loop, which the trainer's equal-backward-count sharding does not use.
    raise RuntimeError(
        f"{kind} is not supported by the round pipeline; launch with recipes/accelerate/ddp.yaml "
        "(data-parallel) or recipes/accelerate/fsdp.yaml (sharded, FSDP2)"
    )


def full_state_dict(accelerator, model) -> dict[str, torch.Tensor]:
    """The model's whole weights on every process; a collective call when training is sharded."""
    if is_sharded(accelerator):
        from torch.distributed.tensor import DTensor

        # Every process gathers every tensor, in the same order (each full_tensor is an
        # all-gather): each process needs the weights to swap its reference, and accelerate's
        # get_state_dict gives them to process 0 alone. Tied weights (lm_head = embeddings) share
        # one shard, so they are gathered once and stay one tensor, as save_pretrained expects.
        gathered: dict[int, torch.Tensor] = {}
        state = {}
        for name, value in model.state_dict().items():
            if isinstance(value, DTensor):
                shard = value.to_local().data_ptr()
                if shard not in gathered:
                    gathered[shard] = value.full_tensor()
                value = gathered[shard]
            state[name] = value
        return state
    return accelerator.get_state_dict(model)
