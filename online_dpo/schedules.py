"""Reference-model schedules and the adaptive-beta controller.

- fixed: the reference stays pi_0 (standard DPO).
- swap: every `every` rounds the reference becomes the current policy (iterative DPO,
  Xiong et al. 2024; Xu et al. 2023).
- ema: every `every` optimizer steps, ref <- alpha * policy + (1 - alpha) * ref (TR-DPO's soft
  update, Gorbatovski et al. 2024).
"""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def soft_update(reference: torch.nn.Module, policy: torch.nn.Module, alpha: float) -> None:
    """ref <- alpha * policy + (1 - alpha) * ref, parameter by parameter, in place."""
    for ref_p, pol_p in zip(reference.parameters(), policy.parameters(), strict=True):
        ref_p.lerp_(pol_p.detach().to(ref_p.dtype), alpha)


def next_beta(beta: float, kl: float, target_kl: float, rate: float,
              min_beta: float = 1e-3, max_beta: float = 10.0) -> float:
    """Proportional controller (as Ziegler et al. 2019 adapt their KL coefficient): a KL above the
    target raises beta (a tighter leash to the reference), below it lowers beta. The relative error
    is clipped to +-0.5 so one noisy KL estimate cannot swing beta wildly."""
    if not math.isfinite(kl):
        return beta
    error = max(-0.5, min(0.5, (kl - target_kl) / target_kl))
    return max(min_beta, min(max_beta, beta * (1 + rate * error)))
