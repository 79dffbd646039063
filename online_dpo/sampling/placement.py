"""Whether a colocated vLLM engine fits on its GPU beside the trainer, checked before it starts.

vLLM checks, as its engine starts, that `gpu_memory_utilization` x the GPU's memory is free, and no
more. The engine is built after the trainer's models, so they are on the GPU by then, but training
adds float32 gradients and Adam moments with its first step, which vLLM cannot know about: a run
that passes vLLM's check can still run out of memory one step later. So the run checks first that
the engine's share plus what training will add fits in what is free, and names the keys to change.
Activations are left out (they depend on the batch), so the check never refuses a run that fits.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
TRAINING_BYTES_PER_PARAMETER = 12  # a float32 gradient and two float32 Adam moments


class EngineDoesNotFitError(RuntimeError):
    pass


@dataclass(frozen=True)
class GPUBudget:
    device: str
    total: int  # the GPU's memory, bytes
    free: int  # free now, with the trainer's models loaded (and sharded)
    utilization: float  # generation.gpu_memory_utilization: the engine takes this share of `total`
    trained_params: int
    shards: int  # processes the gradients and Adam moments are split over (1: each holds them whole)
    sleep: bool  # generation.sleep: the engine frees its memory while the trainer trains

    @property
    def engine(self) -> int:
        return int(self.utilization * self.total)

    @property
    def training(self) -> int:
        return TRAINING_BYTES_PER_PARAMETER * self.trained_params // self.shards

    @property
    def needed(self) -> int:
        # Asleep, the engine and the training state take turns; awake, both stay.
        return max(self.engine, self.training) if self.sleep else self.engine + self.training


def check_engine_fits(budget: GPUBudget) -> None:
    if budget.needed <= budget.free:
        return
    split = f", split over {budget.shards} processes" if budget.shards > 1 else ""
    raise EngineDoesNotFitError(
        f"the colocated vLLM engine does not fit beside the trainer on {budget.device}: "
        f"generation.gpu_memory_utilization={budget.utilization:g} reserves {budget.engine / GIB:.1f} GiB of "
        f"{budget.total / GIB:.1f} GiB, and training will add {budget.training / GIB:.1f} GiB (float32 "
        f"gradients and Adam moments of {budget.trained_params:,} trained parameters{split}), "
        f"{'either of which' if budget.sleep else 'together'} more than the {budget.free / GIB:.1f} GiB free "
        "with the trainer's models loaded. Lower generation.gpu_memory_utilization, "
        + ("" if budget.sleep else "set generation.sleep: true (the engine frees its memory while the "
           "trainer trains), ")
        + "shard the trainer (recipes/accelerate/fsdp.yaml), train a LoRA adapter (train.lora), or sample "
        "on a separate server (generation.backend: vllm_server)."
    )


def shares_the_trainers_gpu(generation) -> bool:
    """An in-process engine, or a launched `vllm serve` without GPUs of its own (launch.devices)."""
    if generation.backend == "vllm":
        return True
    launch = generation.server.launch if generation.backend == "vllm_server" and generation.server else None
    return launch is not None and launch.devices is None


def colocated_budget(recipe, models) -> GPUBudget:
    """This process's GPU, as it is now (CUDA only)."""
    import torch
    from accelerate.utils import DistributedType

    free, total = torch.cuda.mem_get_info(models.device)
    acc = models.accelerator
    split = acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    # A DTensor's numel is the whole parameter's, so this counts the model, not the shard.
    trained = sum(p.numel() for p in models.policy.parameters() if p.requires_grad)
    return GPUBudget(device=str(models.device), total=total, free=free,
                     utilization=recipe.generation.gpu_memory_utilization, trained_params=trained,
                     shards=acc.num_processes if split else 1, sleep=recipe.generation.sleep)
