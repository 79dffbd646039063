"""Process roles when a run is launched with several processes (`accelerate launch`, `torchrun`).

Process 0 owns the sampler, the judges and every artifact; all processes train, each on its own
share of a step's pairs, with gradients averaged (DDP, FSDP2 or DeepSpeed). Decisions that depend
on the run directory are taken by process 0 and broadcast, so no process can race ahead of another.

Under FSDP2 and DeepSpeed ZeRO-3 the policy's weights are sharded, so reading them whole (sampler
sync, reference swap, checkpoint) and running it forward (the sync probe) are collective: every
process joins. ZeRO-1/2 shard only the optimizer state (and gradients): every process holds the
whole weights after each step.
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


def uses_deepspeed(accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator) -> int | None:
    return accelerator.state.deepspeed_plugin.zero_stage if uses_deepspeed(accelerator) else None


def is_sharded(accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP or zero_stage(accelerator) == 3


def describe(accelerator) -> str:
    """How training runs, for train.json: e.g. "DeepSpeed ZeRO-3", "FSDP2", "MULTI_CPU"."""
    if uses_deepspeed(accelerator):
        return f"DeepSpeed ZeRO-{zero_stage(accelerator)}"
    if accelerator.distributed_type == DistributedType.FSDP:
        return f"FSDP{accelerator.state.fsdp_plugin.fsdp_version}"
    return accelerator.distributed_type.value


def load_models_whole(accelerator) -> None:
    """Under ZeRO-3 transformers builds every model partitioned (zero.Init) once accelerate has
    registered the DeepSpeed config. The run reads its frozen reference, pi_0 and model judges
    whole on each process, and DeepSpeed partitions the policy itself when the trainer prepares
    it, so the registration goes. The cost: each process loads the whole policy once."""
    if zero_stage(accelerator) == 3:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()


def prepare_deepspeed_config(accelerator, train) -> None:
    """The recipe drives DeepSpeed's batch settings: the trainer owns accumulation (it marks each
    step's last backward as the boundary), so DeepSpeed must not divide the loss by its own count."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    clipping = config.get("gradient_clipping", "auto")
    if clipping != "auto" and float(clipping) != train.max_grad_norm:
        raise ValueError(f"the DeepSpeed config sets gradient_clipping {clipping} but the recipe's "
                         f"train.max_grad_norm is {train.max_grad_norm}: set one, the other to auto")
    config.update(gradient_accumulation_steps=1, gradient_clipping=train.max_grad_norm,
                  train_micro_batch_size_per_gpu=train.micro_batch_pairs)
    config.pop("train_batch_size", None)  # DeepSpeed derives it from the two above and the world


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
    if kind == DistributedType.DEEPSPEED:
        _check_deepspeed(accelerator, recipe)
        return
    raise RuntimeError(
        f"{kind} is not supported by the round pipeline; launch with recipes/accelerate/ddp.yaml "
        "(data-parallel), recipes/accelerate/fsdp.yaml (sharded, FSDP2) or "
        "recipes/accelerate/deepspeed_zero{2,3}.yaml"
    )


def _check_deepspeed(accelerator, recipe) -> None:
    plugin = accelerator.state.deepspeed_plugin
    if recipe.train.lora is not None:
        raise RuntimeError("train.lora with DeepSpeed is not supported; LoRA already keeps one model "
                           "copy: launch it with recipes/accelerate/ddp.yaml")
    if plugin.deepspeed_config.get("fp16", {}).get("enabled") is True:
        # A dynamic loss scale skips the steps that overflow, silently: a resumed round would no
        # longer match an uninterrupted one, and a skipped round trains nothing.
        raise RuntimeError("DeepSpeed fp16 is not supported: use mixed_precision bf16 (or no)")
    if plugin.zero_stage == 3:
        if plugin.zero3_init_flag:  # load_models_whole says why the run cannot honour it
            raise RuntimeError("DeepSpeed ZeRO-3 with zero3_init_flag: true is not supported: set "
                               "zero3_init_flag: false (recipes/accelerate/deepspeed_zero3.yaml)")
        if recipe.reference.schedule == "ema":
            raise RuntimeError("reference.schedule: ema with ZeRO-3 is not supported (the EMA update "
                               "reads the sharded policy on one process); use fixed or swap")


def full_state_dict(accelerator, model) -> dict[str, torch.Tensor]:
    """The model's whole weights on every process; a collective call when training is sharded."""
    if zero_stage(accelerator) == 3:
        return _gather_zero3(model)
    if uses_deepspeed(accelerator):  # ZeRO-1/2: the module holds the whole, current weights
        return accelerator.unwrap_model(model).state_dict()
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


def _gather_zero3(engine) -> dict[str, torch.Tensor]:
    import deepspeed

    module = engine.module
    # Every process gathers every parameter (modifier_rank None: read-only) and keeps a copy,
    # since the gathered storage is freed when the context exits. Tied weights are one parameter,
    # so they stay one tensor, as save_pretrained expects.
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        copies: dict[int, torch.Tensor] = {}
        state = {}
        for name, value in module.state_dict().items():
            key = value.data_ptr()
            if key not in copies:
                copies[key] = value.detach().clone()
            state[name] = copies[key]
    return state
