"""Padding-free batches give the same log-probs, gradients and training as padded ones."""

import random

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM

from online_dpo.config.recipe import LossConfig, TrainConfig
from online_dpo.pipeline.objectives import Pair, PreferenceObjective, pair_sequences
from online_dpo.training.logprobs import batch_logps, check_packing, collate, score_sequences
from online_dpo.training.losses import sequence_logps
from online_dpo.training.packing import (
    PackingUnsupportedError,
    assign_rows,
    output_head,
    pack,
    packed_logps,
)
from online_dpo.training.trainer import DPOTrainer


def _sequences(n=9, seed=0):
    rng = random.Random(seed)
    return [([rng.randrange(10, 500) for _ in range(rng.randint(3, 12))],
             [rng.randrange(10, 500) for _ in range(rng.randint(1, 20))]) for _ in range(n)]


def test_rows_hold_every_sequence_once_within_the_width():
    lengths = [9, 2, 7, 3, 5, 1, 9, 4]
    rows = assign_rows(lengths, 9)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 9 for row in rows)
    assert rows == [[0], [6], [2, 1], [4, 7], [3, 5]]  # first-fit decreasing, not 8 padded rows
    assert len(assign_rows(lengths, 18)) == 3


def test_pack_marks_completions_and_restarts_positions():
    batch = pack([([1, 2], [3, 4, 5]), ([6], [7])], pad_id=0, row_factor=1.0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 0, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 1, 0, 1, 2]]
    assert batch.attention_mask is None  # no shared prompt: transformers masks by position ids
    # Position t predicts token t+1: flat positions 1, 2, 3 (row 0) and 5 (row 1, column 0).
    assert batch.score_index.tolist() == [1, 2, 3, 5]
    assert batch.score_label.tolist() == [3, 4, 5, 7]
    assert batch.score_owner.tolist() == [0, 0, 0, 1]
    wide = pack([([1, 2], [3, 4, 5]), ([6], [7])], pad_id=0)  # rows up to 10: one row of 7, no tail
    assert wide.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7]]
    assert wide.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1]]


def test_completions_of_one_prompt_share_it():
    # A pair (chosen 3 4, rejected 5 6 7) of prompt 1 2, and a sequence of another prompt.
    batch = pack([([1, 2], [3, 4]), ([9], [8]), ([1, 2], [5, 6, 7])], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 9, 8]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 2, 3, 4, 0, 1]]
    # Both first completion tokens are predicted by the prompt's last position (1).
    assert batch.score_index.tolist() == [1, 2, 1, 4, 5, 7]
    assert batch.score_label.tolist() == [3, 4, 5, 6, 7, 8]
    assert batch.score_owner.tolist() == [0, 0, 2, 2, 2, 1]
    allowed = batch.attention_mask[0, 0].int().tolist()
    assert allowed[5] == [1, 1, 0, 0, 1, 1, 0, 0, 0]  # rejected: prompt and itself, never chosen
    assert allowed[3] == [1, 1, 1, 1, 0, 0, 0, 0, 0]  # chosen: prompt and itself
    assert allowed[8] == [0, 0, 0, 0, 0, 0, 0, 1, 1]  # the other prompt's group: itself only
    assert pack([([1, 2], [3, 4]), ([1, 2], [5])], 0, share_prompts=False).attention_mask is None
    with pytest.raises(ValueError, match="non-empty prompt"):
        pack([([], [3, 4])], 0)


@pytest.fixture
def tiny(tiny_model_dir):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def _full_logits_logps(model, sequences):
    """The plain reference: logits at every position of a padded batch, then sequence_logps."""
    batch = collate(sequences, 2)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_logps(logits, batch["input_ids"], batch["completion_mask"])


def _logps_and_grads(model, fn):
    model.zero_grad()
    out = fn()
    out.sum().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


def _head_positions(model, fn):
    """fn()'s result and, per forward of the LM head during it, the positions it computed logits at."""
    seen = []
    handle = output_head(model).register_forward_hook(lambda _m, _a, out: seen.append(out.shape[:-1].numel()))
    try:
        return fn(), seen
    finally:
        handle.remove()


@pytest.mark.parametrize("path", ["packed", "packed pairs", "padded"])
def test_head_on_scored_positions_only_matches_full_logits(tiny, path):
    """Packed and padded batches run the LM head only where a completion token is predicted,
    and pairs share their prompt; log-probs and gradients equal those of full logits at every
    position of a plain padded batch."""
    sequences = _sequences()
    if path == "packed pairs":  # chosen rows, then rejected rows of the same prompts
        sequences = sequences[:4] + [(p, c[::-1] + [7]) for p, c in sequences[:4]]
    expected, expected_grads = _logps_and_grads(tiny, lambda: _full_logits_logps(tiny, sequences))
    if path.startswith("packed"):
        packed = pack(sequences, pad_id=2)
        assert (packed.attention_mask is not None) == (path == "packed pairs")
        assert packed.input_ids.numel() < collate(sequences, 2)["input_ids"].numel()
        (got, grads), head = _head_positions(
            tiny, lambda: _logps_and_grads(tiny, lambda: packed_logps(tiny, packed)[0]))
        assert packed_logps(tiny, packed)[1].tolist() == [len(c) for _, c in sequences]
    else:
        (got, grads), head = _head_positions(
            tiny, lambda: _logps_and_grads(tiny, lambda: batch_logps(tiny, collate(sequences, 2))))
    # One forward; the head ran at the positions that predict a completion token, nowhere else.
    assert head == [sum(len(c) for _, c in sequences)]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)
    # The head's hook is gone afterwards: a plain forward gives logits at every position again.
    ids = torch.tensor([[1, 5, 6, 7]])
    assert tiny(input_ids=ids).logits.shape[:2] == (1, 4)


def test_the_head_hook_is_removed_when_the_forward_fails(tiny, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(tiny.model, "forward", fail)  # the decoder stack, below the head
    with pytest.raises(RuntimeError, match="out of memory"):
        batch_logps(tiny, collate(_sequences(), 2))
    assert not output_head(tiny)._forward_pre_hooks


class _IgnoresPositions(torch.nn.Module):
    """A model that drops position_ids: packed sequences would attend to each other."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, input_ids, position_ids=None, attention_mask=None, use_cache=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


class _IgnoresMasks(_IgnoresPositions):
    """A model that drops attention masks: a shared prompt's completions would see each other."""

    def forward(self, input_ids, position_ids=None, attention_mask=None, use_cache=None):
        return self.inner(input_ids=input_ids, position_ids=position_ids)


@pytest.mark.parametrize("leaky", [_IgnoresPositions, _IgnoresMasks])
def test_check_packing_accepts_llama_and_rejects_a_leaky_model(tiny, leaky):
    assert check_packing(tiny, 2, "cpu") < 1e-4
    with pytest.raises(PackingUnsupportedError, match="padding_free=false"):
        check_packing(leaky(tiny), 2, "cpu")


def test_scoring_in_batches_shares_prompts_and_keeps_the_order(tiny):
    """score_sequences batches a pair's two sides together; results come back in input order."""
    pairs = _sequences(6, 3)
    sequences = pairs + [(p, c[::-1] + [7]) for p, c in pairs]  # chosen rows, then rejected rows
    masks = []
    handle = tiny.register_forward_pre_hook(lambda _m, _a, kw: masks.append(kw.get("attention_mask")),
                                            with_kwargs=True)
    try:
        batched = score_sequences(tiny, sequences, 2, "cpu", batch_size=4)
    finally:
        handle.remove()
    # 3 batches of 4, each two whole pairs: the prompt-sharing (4-D) mask in every forward. In
    # input order, a batch would hold 4 chosen rows of 4 different prompts: nothing to share.
    assert len(masks) == 3 and all(m is not None and m.dim() == 4 for m in masks)
    one_by_one = torch.cat([score_sequences(tiny, [s], 2, "cpu") for s in sequences])
    torch.testing.assert_close(batched, one_by_one, atol=1e-4, rtol=1e-5)


def test_training_is_the_same_with_and_without_padding(tiny_model_dir):
    pairs = [Pair(p, c, r) for (p, c), (_, r) in zip(_sequences(8, 1), _sequences(8, 2))]
    ref = torch.zeros(len(pairs))
    results = []
    for padding_free in (True, False):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        packed = []  # per forward: did it get packed rows (restarting position ids)?
        model.register_forward_pre_hook(
            lambda _m, _a, kw, seen=packed: seen.append(kw.get("position_ids") is not None), with_kwargs=True)
        train = TrainConfig(learning_rate=1e-3, micro_batch_pairs=4, grad_accum_steps=2, padding_free=padding_free)
        trainer = DPOTrainer(model, LossConfig(beta=0.1), train, pad_id=2, accelerator=Accelerator(cpu=True))
        metrics = trainer.train_round(PreferenceObjective(LossConfig(beta=0.1)), pairs, torch.cat([ref, ref]), seed=0)
        results.append((metrics, {k: v.clone() for k, v in model.state_dict().items()}))
        assert packed and set(packed) == {padding_free}  # the flag really picks the path
    (m1, w1), (m2, w2) = results
    assert m1["loss"] == pytest.approx(m2["loss"], abs=1e-5)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    assert max((w1[k] - initial[k]).abs().max().item() for k in w1) > 5e-4  # one step of lr 1e-3
    for k in w1:
        # The packed rows share each pair's prompt, so sums run in another order; Adam's
        # normalisation magnifies that ~1e-7 gradient noise where a gradient is near 0 (seen:
        # 1.4e-6 on one of 4096 weights), against updates of ~1e-3.
        torch.testing.assert_close(w1[k], w2[k], atol=5e-6, rtol=1e-5)
    assert len(pair_sequences(pairs)) == 16
