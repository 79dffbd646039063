"""Weights move as a stream: buckets, tied names left out, sharded checkpoints that load like save_pretrained's.
The sharded streams (FSDP2 per-parameter gathers, ZeRO-3 per-parameter groups) run in
tests/test_distributed.py, where 2-process checkpoints and syncs must equal 1 process's."""

import json

import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from online_dpo.storage.model_files import write_safetensors_shards
from online_dpo.training.weight_stream import Counted, buckets, full_weights, tied_names


def test_buckets_never_exceed_their_size_unless_one_tensor_does():
    stream = [(str(i), torch.zeros(n)) for i, n in enumerate([10, 10, 30, 5, 5, 5])]  # float32: 4 bytes
    groups = [[name for name, _ in g] for g in buckets(iter(stream), bucket_bytes=80)]
    assert groups == [["0", "1"], ["2"], ["3", "4", "5"]]  # "2" (120 bytes) alone in its group
    assert [len(g) for g in buckets(iter(stream), 10**9)] == [6]


def test_the_stream_of_a_replicated_policy_is_its_own_tensors(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    stream = Counted(full_weights(Accelerator(cpu=True), model))
    own = model.state_dict()
    names = []
    for name, tensor in stream:
        assert tensor.data_ptr() == own[name].data_ptr()  # no copy
        names.append(name)
    assert tied_names(model) == {"lm_head.weight"}
    assert names == [n for n in own if n != "lm_head.weight"]  # each tensor once: the tied head left out
    assert stream.tensors == len(own) - 1
    assert stream.bytes == sum(t.numel() * 4 for n, t in own.items() if n != "lm_head.weight")


def test_a_checkpoint_written_in_shards_loads_like_the_model(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tied = tied_names(model)
    stream = ((n, t) for n, t in model.state_dict().items() if n not in tied)
    files = write_safetensors_shards(tmp_path, buckets(stream, bucket_bytes=2 * 2**20))
    assert len(files) >= 2 and (tmp_path / "model.safetensors.index.json").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files) and "lm_head.weight" not in index["weight_map"]
    assert not list(tmp_path.glob("*.partial"))
    model.config.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    one = tmp_path / "one"
    one.mkdir()
    untied = ((n, t) for n, t in model.state_dict().items() if n not in tied)
    assert write_safetensors_shards(one, buckets(untied, 2**30)) == ["model.safetensors"]
    assert set(load_file(one / "model.safetensors")) == set(model.state_dict()) - tied
