"""Loss family and log-prob extraction on hand-computed cases.

Shared case: policy chosen/rejected = -1/-3, reference = -2/-2, so
logits = (-1 - -3) - (-2 - -2) = 2, and with beta = 0.5, beta * logits = 1.
  sigmoid: -log(sigmoid(1))                    = log(1 + e^-1)          = 0.313262
  ipo:     (logits - 1/(2 beta))^2              = (2 - 1)^2              = 1
  hinge:   relu(1 - beta * logits)              = relu(0)                = 0
  sigmoid, eps=0.1: 0.9 * 0.313262 + 0.1 * 1.313262                   = 0.413262
  robust,  eps=0.1: (0.9 * 0.313262 - 0.1 * 1.313262) / 0.8           = 0.188260
  rewards: chosen 0.5 * (-1 - -2) = 0.5, rejected 0.5 * (-3 - -2) = -0.5
"""

import math

import pytest
import torch

from online_dpo.training.losses import (
    LossType,
    dpo_loss,
    kto_reference_point,
    length_normalized,
    nll_term,
    sequence_logps,
    token_logps,
)

PC, PR, RC, RR = (torch.tensor([v]) for v in (-1.0, -3.0, -2.0, -2.0))


@pytest.mark.parametrize(
    "loss_type, eps, expected",
    [("sigmoid", 0.0, 0.313262), ("ipo", 0.0, 1.0), ("hinge", 0.0, 0.0),
     ("sigmoid", 0.1, 0.413262), ("robust", 0.1, 0.188260)],
)
def test_hand_computed_losses(loss_type, eps, expected):
    losses, chosen, rejected = dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type=loss_type, label_smoothing=eps)
    assert losses.shape == (1,)
    assert losses.item() == pytest.approx(expected, abs=1e-5)
    assert chosen.item() == pytest.approx(0.5)
    assert rejected.item() == pytest.approx(-0.5)


@pytest.mark.parametrize("loss_type", [t for t in LossType if t.paired])
def test_rewards_detached_and_preferred_side_gets_lower_loss(loss_type):
    pc = torch.tensor([-1.0, -3.0], requires_grad=True)
    pr = torch.tensor([-3.0, -1.0], requires_grad=True)
    ref = torch.tensor([-2.0, -2.0])
    losses, chosen, rejected = dpo_loss(pc, pr, ref, ref, beta=0.1, loss_type=loss_type, label_smoothing=0.1)
    assert not chosen.requires_grad and not rejected.requires_grad
    assert losses.requires_grad
    assert losses[0] < losses[1]  # the policy already prefers the chosen side in example 0


def test_sigmoid_is_stable_for_huge_margins():
    big = torch.tensor([1e4])
    losses, _, _ = dpo_loss(-big, big, torch.zeros(1), torch.zeros(1), beta=1.0)
    assert torch.isfinite(losses).all()
    assert losses.item() == pytest.approx(2e4)


def test_per_example_outputs():
    losses, c, r = dpo_loss(torch.zeros(5), torch.zeros(5), torch.zeros(5), torch.zeros(5), beta=0.1)
    assert losses.shape == c.shape == r.shape == (5,)
    assert losses[0].item() == pytest.approx(math.log(2))


def test_sequence_logps_masks_prompt_and_padding():
    # Vocab of 2 with uniform logits: every token has log-prob log(1/2).
    # Sequence [p, c, c, pad]: only the two completion tokens count.
    logits = torch.zeros(1, 4, 2)
    labels = torch.tensor([[0, 1, 0, 1]])
    mask = torch.tensor([[0, 1, 1, 0]])
    assert sequence_logps(logits, labels, mask).item() == pytest.approx(2 * math.log(0.5))
    assert sequence_logps(logits, labels, mask, average=True).item() == pytest.approx(math.log(0.5))


def test_sequence_logps_reads_the_shifted_position():
    # Position t's logits predict token t+1. Put all mass on token 1 at position 0 only.
    logits = torch.zeros(1, 3, 2)
    logits[0, 0, 1] = 100.0
    labels = torch.tensor([[0, 1, 1]])
    mask = torch.tensor([[0, 1, 0]])  # score only token 1 (predicted from position 0)
    assert sequence_logps(logits, labels, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert token_logps(logits, labels)[0, 1].item() == pytest.approx(math.log(0.5))


def test_kto_is_not_a_pairwise_loss():
    with pytest.raises(ValueError, match="not a pairwise loss"):
        dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="kto")


def test_length_normalisation_and_nll_term_by_hand():
    # Summed log-probs -6 over 3 tokens and -2 over 4 tokens: means -2 and -0.5; a zero length
    # counts as 1. NLL of the chosen side = -mean(-2, -0.5) = 1.25.
    logps, lengths = torch.tensor([-6.0, -2.0, -1.0]), torch.tensor([3, 4, 0])
    assert length_normalized(logps, lengths).tolist() == [-2.0, -0.5, -1.0]
    assert nll_term(logps[:2], lengths[:2]).item() == pytest.approx(1.25)


def test_kto_reference_point_from_mismatched_pairs_by_hand():
    # Mismatched pairs (x_i, y_j): policy -3, -5, -4; reference -4, -4, -6; log-ratios 1, -1, 2;
    # z0 = mean = 2/3. Detached, and clamped at 0 when the mean is negative; no pairs gives 0.
    policy = torch.tensor([-3.0, -5.0, -4.0], requires_grad=True)
    z0 = kto_reference_point(policy, torch.tensor([-4.0, -4.0, -6.0]))
    assert z0.item() == pytest.approx(2 / 3) and not z0.requires_grad
    assert kto_reference_point(torch.tensor([-5.0]), torch.tensor([-4.0])).item() == 0.0
    assert kto_reference_point(torch.zeros(0), torch.zeros(0)).item() == 0.0


def test_kto_objective_estimates_z0_on_mismatched_pairs_only():
    """z0 comes from (prompt_i, completion of the next example with another prompt), never from
    the example's own completion, so what the labels teach about y_i does not move its own z0."""
    from online_dpo.config.recipe import LossConfig
    from online_dpo.pipeline.objectives import Example, KTOObjective, mismatched_partners

    assert mismatched_partners([[1], [1], [2], [3]]) == [2, 2, 3, 0]
    assert mismatched_partners([[1], [1]]) == [None, None]
    items = [Example([1], [10], True), Example([2], [20], False)]
    objective = KTOObjective(LossConfig(loss_type="kto", beta=1.0))
    sequences = objective.reference_sequences(items)
    assert sequences == [([1], [10]), ([2], [20]), ([1], [20]), ([2], [10])]
    # A fake policy scoring sequence (x, y) as -(x + y / 10): own completions -2 and -4,
    # mismatched ([1],[20]) -3 and ([2],[10]) -3. Reference: own -2.5 / -3.5, mismatched -4 / -3.
    def policy_logps(seqs):
        return torch.tensor([-(p[0] + c[0] / 10) for p, c in seqs]), torch.ones(len(seqs))

    reference = torch.tensor([-2.5, -3.5, -4.0, -3.0])
    loss, metrics = objective.loss(policy_logps, items, [0, 1], reference, beta=1.0)
    # z0 = mean(-3 - -4, -3 - -3) = 0.5. Log-ratios: 0.5 (desirable), -0.5 (undesirable).
    assert metrics["kto_reference_point"] == pytest.approx(0.5)
    expected = ((1 - torch.sigmoid(torch.tensor(0.0))) + (1 - torch.sigmoid(torch.tensor(1.0)))) / 2
    assert loss.item() == pytest.approx(expected.item())
