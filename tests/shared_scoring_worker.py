"""2 processes (torchrun, gloo) score the same sequences with `score_shared`, for
tests/test_shared_scoring.py: a whole model on each process, then FSDP2-sharded (collective
forwards). Each process writes what it got and how many forwards and tokens it ran."""

import datetime
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM

from online_dpo.training.distributed import Processes
from online_dpo.training.shared_scoring import score_shared

model_dir, sequences_file, out = sys.argv[1:4]
# A mismatched collective must fail the test within a minute, not hang for accelerate's 30.
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
procs = Processes()
sequences = [tuple(s) for s in json.loads(open(sequences_file).read())]
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
work = {"forwards": 0, "tokens": 0}


def count(module, args, kwargs):
    work["forwards"] += 1
    work["tokens"] += int(kwargs["input_ids"].numel())


model.register_forward_pre_hook(count, with_kwargs=True)
result = {}
for name, collective in (("whole", False), ("sharded", True)):
    if collective:
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    work.update(forwards=0, tokens=0)
    scored = score_shared(procs, model, sequences, 2, torch.device("cpu"), collective=collective)
    result[name] = {"values": scored.values.tolist(), "per_process": scored.per_process, **work}
with open(f"{out}/rank_{procs.rank}.json", "w") as f:
    json.dump(result, f)
dist.barrier()
dist.destroy_process_group()
