"""The LM head in vocabulary chunks: the same log-probs and gradients as whole logits, without
ever holding a (K x V) tensor. Under DDP its gradient all-reduces like any other:
tests/test_distributed.py trains the tied head/embedding through this path on 2 processes and
requires both to hold identical weights equal to 1 process's."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from online_dpo.training.chunked_logps import ChunkedTokenLogps, chunked_token_logps
from online_dpo.training.packing import output_head, pack, packed_logps


def _whole(hidden, weight, bias, labels):
    logits = hidden @ weight.T + (0 if bias is None else bias)
    return torch.log_softmax(logits, -1).gather(1, labels.unsqueeze(1)).squeeze(1)


def test_gradients_match_finite_differences_across_chunk_edges():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(9, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(23, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    bias = torch.randn(23, dtype=torch.float64, generator=gen, requires_grad=True)
    # Labels at both edges of the 7-entry chunks and in the last, short chunk (21, 22).
    labels = torch.tensor([0, 6, 7, 13, 14, 20, 21, 22, 3])
    assert torch.autograd.gradcheck(lambda h, w, b: ChunkedTokenLogps.apply(h, w, b, labels, 7),
                                    (hidden, weight, bias))


@pytest.mark.parametrize("chunk", [3, 100, 999, 1000, 4096])
def test_values_and_gradients_equal_whole_logits(chunk):
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(37, 16, generator=gen) * 3
    weight = torch.randn(1000, 16, generator=gen)
    labels = torch.randint(0, 1000, (37,), generator=gen)
    upstream = torch.randn(37, generator=gen)
    results = []
    for fn in (_whole, lambda h, w, b, y: ChunkedTokenLogps.apply(h, w, b, y, chunk)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = fn(h, w, None, labels)
        (out * upstream).sum().backward()
        results.append((out.detach(), h.grad, w.grad))
    for whole, chunked in zip(*results, strict=True):
        torch.testing.assert_close(chunked, whole, atol=5e-5, rtol=1e-5)  # sums of up to 334 chunks


def test_no_tensor_of_tokens_times_vocabulary_is_kept_for_backward():
    head = torch.nn.Linear(16, 5000, bias=False)
    hidden = torch.randn(64, 16, requires_grad=True)
    labels = torch.randint(0, 5000, (64,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        chunked_token_logps(hidden, head, labels, chunk=512).sum().backward()
    assert saved and max(saved) <= 5000 * 16  # the weight itself, not 64 x 5000 logits
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        _whole(hidden, head.weight, None, labels).sum()
    assert max(saved) >= 64 * 5000  # what the whole path keeps: the test sees the difference


@pytest.mark.slow
def test_smollm2_packed_logps_and_gradients_equal_whole_logits(smollm2_dir):
    """The real model through packed_logps (the chunked head inside its forward: 6 chunks of
    SmolLM2's 49,152 entries, tied embeddings) against the head run whole on the same hidden
    states. "Equal within float32 rounding": the chunked float32 result is no further from a
    float64 computation than the whole float32 one is."""
    gen = torch.Generator().manual_seed(0)
    sequences = [(torch.randint(10, 40000, (6,), generator=gen).tolist(),
                  torch.randint(10, 40000, (n,), generator=gen).tolist()) for n in (5, 9, 3)]
    batch = pack(sequences, pad_id=2)

    def logps_and_grads(dtype, chunked):
        model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=dtype)
        head = output_head(model)
        if chunked:
            out = packed_logps(model, batch)[0]
            assert "forward" not in vars(head)  # the chunked forward lasts one call
        else:
            hidden = model.model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                                 use_cache=False).last_hidden_state.flatten(0, 1)[batch.score_index]
            per_token = _whole(hidden, head.weight, None, batch.score_label)
            out = per_token.new_zeros(batch.count).index_add(0, batch.score_owner, per_token)
        out.sum().backward()
        return [t.double() for t in (out.detach(), head.weight.grad, model.model.layers[0].mlp.up_proj.weight.grad)]

    truth = logps_and_grads(torch.float64, chunked=False)
    whole = logps_and_grads(torch.float32, chunked=False)
    chunked = logps_and_grads(torch.float32, chunked=True)
    for c, w, t in zip(chunked, whole, truth, strict=True):
        assert (c - t).norm() <= 2 * (w - t).norm() + 1e-6 * t.norm()  # 1e-6: ~8 float32 epsilons
    assert chunked[1].abs().sum() > 0
