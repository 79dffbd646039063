"""The learning rate over the whole run: warm-up and decay through transformers' schedulers.

A round's number of optimizer steps is known only when its pairs are (a judge keeps fewer pairs
some rounds), so the schedule is laid over the run's progress instead of a step count fixed up
front: step t of the T steps of round k (of R) is centred at (k - 1 + (t + 1/2) / T) / R of the
run, and its learning rate is what transformers' scheduler gives at that fraction of its steps
(the centre, so that neither the first step of a warm-up nor the last of a decay gets rate 0). The run
ends at the end of its schedule whatever each round kept, and the rate depends only on (k, t, T),
so a resumed round gets the rates an uninterrupted one got, with no scheduler state to save.
"""

from __future__ import annotations

import torch
from transformers import get_scheduler

# Schedule units per round: the scheduler's steps are this fine a grid over the run.
UNITS_PER_ROUND = 10_000
SCHEDULERS = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


class RunSchedule:
    def __init__(self, name: str, warmup_ratio: float, rounds: int, learning_rate: float):
        self.learning_rate = learning_rate
        total = rounds * UNITS_PER_ROUND
        # A throwaway optimizer: get_scheduler builds the library's schedule function around one.
        probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        scheduler = get_scheduler(SCHEDULERS[name], probe, num_warmup_steps=round(warmup_ratio * total),
                                  num_training_steps=total)
        self.factor = scheduler.lr_lambdas[0]

    def rate(self, k: int, step: int, steps: int) -> float:
        """The learning rate of optimizer step `step` (0-based) of the `steps` steps of round k."""
        return self.learning_rate * self.factor((k - 1 + (step + 0.5) / steps) * UNITS_PER_ROUND)
