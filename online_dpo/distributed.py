"""Process roles when a run is launched with several processes (`accelerate launch`, `torchrun`).

Process 0 owns the sampler, the judges and every artifact; all processes train, each on its own
share of a step's pairs, with gradients averaged (DDP). Decisions that depend on the run
directory are taken by process 0 and broadcast, so no process can race ahead of another.
"""

from __future__ import annotations

import torch
from accelerate import PartialState
from accelerate.utils import DistributedType, broadcast_object_list

# Data parallelism without sharding: every process holds whole models, so syncing the sampler
# and swapping the reference need no gathering.
SUPPORTED = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)


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


def check_supported(accelerator) -> None:
    if accelerator.distributed_type not in SUPPORTED:
        raise RuntimeError(
            f"the round pipeline runs data-parallel (DDP) only; {accelerator.distributed_type} "
            "shards the model, and its gather before the sampler sync is not wired into the "
            "pipeline yet. Launch with recipes/accelerate/ddp.yaml or torchrun."
        )
