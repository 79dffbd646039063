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

from online_dpo.losses import LossType, dpo_loss, sequence_logps, token_logps

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
