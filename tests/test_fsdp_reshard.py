"""FSDP2 keeps its root's parameters whole after a forward, for the backward it expects. A
frozen scoring pass has no backward, so it shards them again: nothing whole stays behind."""

import socket

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from online_dpo.training.logprobs import score_sequences


@pytest.fixture
def one_process_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_scoring_leaves_the_sharded_policys_root_sharded(tiny_model_dir, one_process_group):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)  # the root: embeddings, the tied head, the final norm

    def root_is_sharded() -> bool:
        return isinstance(model.model.embed_tokens.weight, DTensor)

    assert root_is_sharded()
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 5, 6, 7]]))
    assert not root_is_sharded()  # what FSDP2 does: whole until a backward
    model.reshard()
    sequences = [([5, 6, 7], [8, 9, 10]), ([12, 13], [14, 15])]
    scores = score_sequences(model, sequences, pad_id=2, device=torch.device("cpu"))
    assert torch.isfinite(scores).all()
    assert root_is_sharded()
