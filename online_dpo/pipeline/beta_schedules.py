"""Beta schedules, chosen once from the `loss` section: a constant beta, or one adapted after each
evaluated round to hold KL-to-reference near `loss.target_kl`."""

from __future__ import annotations

import math

from online_dpo.storage.artifacts import RunDir, read_json


def next_beta(beta: float, kl: float, target_kl: float, rate: float,
              min_beta: float = 1e-3, max_beta: float = 10.0) -> float:
    """Proportional controller (as Ziegler et al. 2019 adapt their KL coefficient): a KL above the
    target raises beta (a tighter leash to the reference), below it lowers beta. The relative error
    is clipped to +-0.5 so one noisy KL estimate cannot swing beta wildly."""
    if not math.isfinite(kl):
        return beta
    error = max(-0.5, min(0.5, (kl - target_kl) / target_kl))
    return max(min_beta, min(max_beta, beta * (1 + rate * error)))


class ConstantBeta:
    def __init__(self, beta: float):
        self.beta = beta

    def value(self, k: int) -> float:
        return self.beta

    def after_eval(self, k: int, kl_to_reference: float) -> dict:
        return {}


class AdaptiveBeta(ConstantBeta):
    """loss.target_kl: after each round, move beta to keep KL-to-reference near the target. The next
    value is carried in eval.json, so a resumed run reproduces it."""

    def __init__(self, beta: float, run_dir: RunDir, target_kl: float, rate: float):
        super().__init__(beta)
        self.run_dir, self.target_kl, self.rate = run_dir, target_kl, rate

    def value(self, k: int) -> float:
        return self.beta if k <= 1 else read_json(self.run_dir.round(k - 1) / "eval.json")["beta_next"]

    def after_eval(self, k: int, kl_to_reference: float) -> dict:
        return {"beta_next": next_beta(self.value(k), kl_to_reference, self.target_kl, self.rate)}


def build_beta(loss, run_dir: RunDir) -> ConstantBeta:
    if loss.target_kl is None:
        return ConstantBeta(loss.beta)
    return AdaptiveBeta(loss.beta, run_dir, loss.target_kl, loss.beta_adapt_rate)
