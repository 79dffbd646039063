"""The DPO loss family as pure functions of four log-prob tensors, plus sequence log-probs.

Every loss takes `(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
reference_rejected_logps)`, each of shape (B,), holding summed (or mean) log-probs of whole
completions, and returns `(losses, chosen_rewards, rejected_rewards)`, each of shape (B,), with
the rewards detached. Batch reduction is the caller's business.
"""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F


class LossType(str, Enum):
    SIGMOID = "sigmoid"  # DPO, Rafailov et al. 2023, eq. 7
    IPO = "ipo"  # Azar et al. 2023, eq. 17
    HINGE = "hinge"  # SLiC, Zhao et al. 2023
    ROBUST = "robust"  # cDPO / robust DPO, Chowdhury et al. 2024
    KTO = "kto"  # Ethayarajh et al. 2024: unpaired good/bad labels, see kto_loss

    @property
    def needs_reference_model(self) -> bool:
        return True

    @property
    def paired(self) -> bool:
        """Trains on (chosen, rejected) pairs; KTO trains on single labelled completions."""
        return self is not LossType.KTO


def _sigmoid(logits: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    # Conservative DPO: with probability eps the label is flipped. logsigmoid is the stable
    # form of log(sigmoid(x)); it never overflows for large |x|.
    return (
        -F.logsigmoid(beta * logits) * (1 - label_smoothing)
        - F.logsigmoid(-beta * logits) * label_smoothing
    )


def _ipo(logits: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    # IPO regresses the log-ratio gap onto 1/(2*tau); beta plays the role of tau.
    return (logits - 1 / (2 * beta)) ** 2


def _hinge(logits: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    return torch.relu(1 - beta * logits)


def _robust(logits: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    # Unbiased estimator of the clean-label loss under label noise eps (Chowdhury et al., eq. 10).
    eps = label_smoothing
    return (
        -F.logsigmoid(beta * logits) * (1 - eps) + F.logsigmoid(-beta * logits) * eps
    ) / (1 - 2 * eps)


_LOSSES = {
    LossType.SIGMOID: _sigmoid,
    LossType.IPO: _ipo,
    LossType.HINGE: _hinge,
    LossType.ROBUST: _robust,
}


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: LossType | str = LossType.SIGMOID,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example preference losses and implicit rewards.

    logits = (pi_c - pi_r) - (ref_c - ref_r); the implicit reward of a completion is
    beta * (log pi(y|x) - log ref(y|x)) (DPO paper, section 5).
    """
    if not LossType(loss_type).paired:
        raise ValueError(f"{loss_type} is not a pairwise loss; use kto_loss")
    loss_fn = _LOSSES[LossType(loss_type)]
    logits = (policy_chosen_logps - policy_rejected_logps) - (
        reference_chosen_logps - reference_rejected_logps
    )
    losses = loss_fn(logits, beta, label_smoothing)
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token log-probs (B, T-1) of labels[:, 1:] under logits[:, :-1]."""
    # gather - logsumexp avoids materialising a full (B, T, V) log_softmax copy.
    logits = logits[:, :-1].float()
    picked = torch.gather(logits, 2, labels[:, 1:].unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, average: bool = False
) -> torch.Tensor:
    """Summed (or mean) log-probs of the masked tokens of each sequence.

    logits: (B, T, V) from a causal LM run on `labels` (B, T); position t predicts token t+1.
    mask: (B, T), 1 where labels[:, t] is a completion token to score (prompt and padding are 0).
    Returns (B,).
    """
    logps = token_logps(logits, labels)
    mask = mask[:, 1:].to(logps.dtype)
    summed = (logps * mask).sum(-1)
    if average:
        return summed / mask.sum(-1).clamp(min=1)
    return summed


def length_normalized(logps: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean instead of summed token log-probs (SimPO/R-DPO-style length control): (B,) / (B,)."""
    return logps / lengths.clamp(min=1)


def nll_term(logps: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """RPO's auxiliary loss (Pang et al. 2024): the mean per-token negative log-likelihood of the
    preferred completions, a scalar. logps are summed per sequence (B,), lengths (B,)."""
    return -(logps / lengths.clamp(min=1)).mean()


def kto_reference_point(policy_mismatched_logps: torch.Tensor,
                        reference_mismatched_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0 (Ethayarajh et al. 2024, sec. 4.1): an estimate of
    KL(pi || ref) from *mismatched* pairs, prompt x_i with the completion y_j of another prompt, so
    the estimate does not reflect what the labels teach about y_i. Both (M,); returns a detached
    scalar, clamped at 0 as in the paper. No mismatched pairs (M = 0) gives z0 = 0."""
    if policy_mismatched_logps.numel() == 0:
        return policy_mismatched_logps.new_zeros(())
    return (policy_mismatched_logps - reference_mismatched_logps).mean().detach().clamp(min=0)


def kto_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    desirable: torch.Tensor,
    *,
    beta: float,
    reference_point: torch.Tensor,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO (Ethayarajh et al. 2024, eq. 8) for unpaired completions with binary labels.

    policy_logps, reference_logps: (B,) sequence log-probs; desirable: (B,) bool;
    reference_point: the scalar z0 from `kto_reference_point` (treated as a constant).
    Returns per-example losses and detached implicit rewards beta * (log pi - log ref).
    """
    logratio = policy_logps - reference_logps
    z0 = reference_point.detach().clamp(min=0)
    good = desirable_weight * (1 - torch.sigmoid(beta * (logratio - z0)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratio)))
    return torch.where(desirable, good, bad), (beta * logratio).detach()
