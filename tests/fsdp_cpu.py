"""`online-dpo` with FSDP2 on CPU processes, for tests/test_distributed.py.

accelerate turns FSDP on for accelerators only: on this CPU machine `accelerate launch
--config_file recipes/accelerate/fsdp.yaml` gives plain DDP. torch's FSDP2 itself runs on CPU
with gloo, so this launcher builds the run's Accelerator from the same FSDP_* variables that
`accelerate launch` set and switches its state to FSDP. Everything after that is the real code
path: `fully_shard` wrapping, sharded AdamW, collective gathers and forwards.
"""

import sys

import accelerate
from accelerate.utils import DistributedType

import online_dpo.training.models
from online_dpo.cli import main


def fsdp_on_cpu(**kwargs) -> accelerate.Accelerator:
    plugin = accelerate.FullyShardedDataParallelPlugin()  # reads the FSDP_* variables
    acc = accelerate.Accelerator(**kwargs, fsdp_plugin=plugin)
    assert acc.distributed_type == DistributedType.MULTI_CPU, acc.distributed_type
    acc.state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = plugin
    # AcceleratorState() re-reads the process-wide state when accelerate builds it again.
    accelerate.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return acc


if __name__ == "__main__":
    online_dpo.training.models.Accelerator = fsdp_on_cpu
    sys.exit(main(sys.argv[1:]))
