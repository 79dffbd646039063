"""Process roles when a run is launched with several processes (`accelerate launch`, `torchrun`).

Process 0 owns the judges and every artifact (and, with generation.engines: process0, the only
sampler); all processes train, each on its own share of a step's pairs, with gradients averaged
(DDP, FSDP2 or DeepSpeed). Whether a step is done is decided by process 0 and broadcast, so no
process can race ahead of another.

Under FSDP2 and DeepSpeed ZeRO-3 the policy's weights are sharded, so reading them whole (sampler
sync, checkpoint: a stream, online_dpo/training/weight_stream.py) and running it forward (the sync
probe, a swap-every-round reference) are collective: every process joins. ZeRO-1/2 shard only the optimizer state (and gradients): every process holds the
whole weights after each step.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import accelerate.utils.other
import torch
from accelerate import PartialState
from accelerate.utils import DistributedType, broadcast_object_list

# Every process holds whole models: syncing the sampler and swapping the reference gather nothing.
REPLICATED = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)


def import_deepspeed_only_when_used() -> None:
    """accelerate unwraps a model (Accelerator.unwrap_model, and transformers' save_pretrained
    through it) by importing deepspeed whenever it is *installed*, to test for a DeepSpeedEngine;
    on a CPU machine that import alone prints DeepSpeed's "Setting accelerator to CPU". No model
    can be a DeepSpeedEngine before deepspeed is imported (accelerate imports it when its config
    asks for DeepSpeed), so that test now asks whether it was. Idempotent."""
    accelerate.utils.other.is_deepspeed_available = _deepspeed_imported


def _deepspeed_imported() -> bool:
    return "deepspeed" in sys.modules


import_deepspeed_only_when_used()


class Processes:
    def __init__(self):
        self.state = PartialState(cpu=not torch.cuda.is_available())
        self.main = self.state.is_main_process
        self.rank = self.state.process_index
        self.world = self.state.num_processes
        # What the other processes run when process 0 asks (`serve`, `ask`): sampling their share
        # of the prompts, joining a sharded model's forward.
        self.handlers: dict[str, Callable] = {}
        self.broken = False  # every process raised together: nobody is left to release

    def serve(self, work: Callable[[], None]) -> None:
        """Process 0 runs `work` (a step of its own); meanwhile the others run what it asks for."""
        if not self.main:
            while (request := self.agree(None)) is not None:
                name, args = request
                self.handlers[name](*args)
            return
        try:
            work()
        finally:  # releases the others, also when process 0's work fails (unless all failed together)
            if not self.broken:
                self.agree(None)

    def ask(self, name: str, *args) -> None:
        """Process 0, inside `serve`: every other process runs handler `name` on `args` (process 0
        then runs its own part, so the collectives meet)."""
        self.agree((name, args))

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


def end_finished_processes() -> None:
    """After a run that every process finished: destroy the process group, then end the process
    at once (`os._exit(0)`, after flushing the console). Left to the interpreter's exit, a thread
    of gloo's or DeepSpeed's that is still joinable when its owner is destroyed aborts the process
    (SIGABRT, "terminate called without an active exception"): seen after FSDP2 runs, and after a
    ZeRO-3 run on 2026-12-07 with the group already destroyed. Nothing is lost by skipping the
    teardown: artifacts are written atomically, trackers finish each round, and the run closed its
    sampler and judges. Not after a failure (the others may be mid-collective), and one process
    returns as usual."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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


def whole_tensor(value: torch.Tensor) -> torch.Tensor:
    """A whole tensor from an FSDP2 shard (an all-gather: collective), or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def reshard_root(model) -> None:
    """FSDP2 keeps its root module's parameters (the embeddings, the head, the final norm) whole
    after a forward, for the backward it expects next. After a forward with no backward (scoring,
    the probe, eval's KL) they would stay whole until the next train step: shard them again.
    A no-op for any other model."""
    from torch.distributed.fsdp import FSDPModule

    module = getattr(model, "wrapped", model)  # the policy behind its adapter-off view
    if isinstance(module, FSDPModule):
        module.reshard()

