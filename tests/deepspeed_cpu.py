"""`online-dpo` with DeepSpeed ZeRO on CPU processes, for tests/test_distributed.py.

accelerate turns DeepSpeed on for accelerators only: on a CPU machine it initializes DeepSpeed's
process group but reports one process. DeepSpeed itself trains on CPU (its CPU accelerator, gloo),
so this launcher builds the run's Accelerator as a CPU data-parallel one and switches its state
to DeepSpeed with the plugin read from the ACCELERATE_DEEPSPEED_* variables that `accelerate
launch --config_file recipes/accelerate/deepspeed_zero*.yaml` set. Everything after that is the
real code path: the DeepSpeed engine, ZeRO's partitioned optimizer, collective gathers.
"""

import sys

import accelerate
from accelerate.utils import DeepSpeedPlugin, DistributedType

import online_dpo.training.models
from online_dpo.cli import main


def deepspeed_on_cpu(**kwargs) -> accelerate.Accelerator:
    plugin = DeepSpeedPlugin()
    kwargs["cpu"] = True
    acc = accelerate.Accelerator(**kwargs)
    assert acc.distributed_type == DistributedType.MULTI_CPU, acc.distributed_type
    plugin.set_mixed_precision(kwargs.get("mixed_precision", "no"))
    plugin.select(_from_accelerator_state=True)
    acc.state.deepspeed_plugins = plugin
    acc.state.distributed_type = DistributedType.DEEPSPEED
    # AcceleratorState() re-reads the process-wide state when accelerate builds it again.
    accelerate.PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED
    return acc


if __name__ == "__main__":
    online_dpo.training.models.Accelerator = deepspeed_on_cpu
    sys.exit(main(sys.argv[1:]))
