"""Training objectives, chosen once from `loss.loss_type`: what a round trains on and its loss.

An objective owns its column schema (the round's `pairs/` dataset), how a round's judged samples
or an offline dataset become those columns, which sequences need reference log-probs, and the
loss of one micro-batch. One `DPOTrainer.train_round` serves every objective.

- `PreferenceObjective`: DPO and its pairwise variants (sigmoid, IPO, hinge, robust/cDPO) on
  (chosen, rejected) pairs.
- `KTOObjective`: KTO on single completions labelled desirable or not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from online_dpo.config.recipe import LossConfig
from online_dpo.data.offline_pairs import (
    EXAMPLE_COLUMNS,
    PAIR_COLUMNS,
    example_columns_from_dataset,
    load_example_rows,
    load_preference_rows,
    pair_columns_from_dataset,
)
from online_dpo.pipeline.pair_selection import example_columns, pair_columns
from online_dpo.training.losses import (
    LossType,
    dpo_loss,
    kto_loss,
    kto_reference_point,
    length_normalized,
    nll_term,
)

Sequences = list[tuple[list[int], list[int]]]
# The policy's summed log-probs and completion lengths of sequences, with gradients.
PolicyLogps = Callable[[Sequences], tuple[torch.Tensor, torch.Tensor]]


class NonFiniteLossError(RuntimeError):
    pass


@dataclass(frozen=True)
class Pair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


@dataclass(frozen=True)
class Example:
    """One labelled completion, for KTO."""

    prompt_ids: list[int]
    completion_ids: list[int]
    desirable: bool


def pair_sequences(pairs: Sequence[Pair]) -> Sequences:
    """Chosen rows first, then rejected rows: one forward pass scores both sides."""
    return [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]


def mismatched_partners(prompts: Sequence[Sequence[int]]) -> list[int | None]:
    """For each item, the next item (cyclically) with a different prompt: its completion paired
    with this item's prompt is a mismatched pair for KTO's reference point. None if every prompt
    is the same."""
    n = len(prompts)
    partners: list[int | None] = []
    for i in range(n):
        partner = next((j % n for j in range(i + 1, i + n) if prompts[j % n] != prompts[i]), None)
        partners.append(partner)
    return partners


def _check_finite(loss: torch.Tensor, what: str) -> None:
    if not torch.isfinite(loss):
        raise NonFiniteLossError(f"non-finite {what} loss {loss.item()}; lower train.learning_rate or "
                                 "loss.beta. The last good checkpoint is kept.")


class PreferenceObjective:
    """Pairwise losses on (chosen, rejected); `reference` holds chosen rows, then rejected rows."""

    columns = PAIR_COLUMNS
    items_per_slot = 1  # items per train.micro_batch_pairs slot

    def __init__(self, cfg: LossConfig):
        self.cfg = cfg

    def from_round(self, records: list[dict], judgments: list[dict], sampler_round: int) -> dict[str, list]:
        return pair_columns(records, judgments, sampler_round)

    def from_dataset(self, path: str, models) -> dict[str, list]:
        return pair_columns_from_dataset(path, models)

    def check_dataset(self, path: str) -> None:
        load_preference_rows(path)

    def items(self, ds) -> list[Pair]:
        return [Pair(p, c, r) for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"], strict=True)]

    def reference_sequences(self, items: Sequence[Pair]) -> Sequences:
        return pair_sequences(items)

    def sampler_logps(self, ds) -> tuple[torch.Tensor, list[int | None]]:
        """The sampler's log-probs of `reference_sequences`, and which policy round sampled each."""
        logps = torch.tensor(list(ds["chosen_sample_logp"]) + list(ds["rejected_sample_logp"]))
        return logps, list(ds["sampler_round"]) * 2

    def loss(self, policy_logps: PolicyLogps, items: Sequence[Pair], idx: list[int],
             reference: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict]:
        n, total = len(idx), len(items)
        summed, lengths = policy_logps(pair_sequences([items[i] for i in idx]))
        index = torch.tensor(idx, device=reference.device)
        ref = torch.cat([reference[index], reference[index + total]])
        logps = summed
        if self.cfg.length_normalize:
            logps, ref = length_normalized(summed, lengths), length_normalized(ref, lengths)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            logps[:n], logps[n:], ref[:n], ref[n:], beta=beta, loss_type=self.cfg.loss_type,
            label_smoothing=self.cfg.label_smoothing)
        nll = nll_term(summed[:n], lengths[:n])
        loss = losses.mean()
        if self.cfg.nll_weight:  # RPO; without it the NLL is only reported (0 * an inf NLL is NaN)
            loss = loss + self.cfg.nll_weight * nll
        _check_finite(loss, "DPO")
        return loss, {"loss": loss.item(), "accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
                      "chosen_reward": chosen_rewards.mean().item(),
                      "rejected_reward": rejected_rewards.mean().item(), "chosen_nll": nll.item()}

    def summary(self, metrics: dict, items: Sequence) -> dict:
        return {**metrics, "reward_margin": metrics["chosen_reward"] - metrics["rejected_reward"],
                "train_pairs": len(items)}

    def describe(self, columns: dict[str, list]) -> dict:
        return {"pairs": len(columns["prompt"])}


class KTOObjective:
    """KTO; `reference` holds the completions' rows, then their mismatched partners' rows."""

    columns = EXAMPLE_COLUMNS
    items_per_slot = 2  # a pair's worth of single completions

    def __init__(self, cfg: LossConfig):
        self.cfg = cfg

    def from_round(self, records: list[dict], judgments: list[dict], sampler_round: int) -> dict[str, list]:
        return example_columns(records, judgments, sampler_round, self.cfg.kto_threshold)

    def from_dataset(self, path: str, models) -> dict[str, list]:
        return example_columns_from_dataset(path, models)

    def check_dataset(self, path: str) -> None:
        load_example_rows(path)

    def items(self, ds) -> list[Example]:
        return [Example(p, c, bool(label)) for p, c, label in
                zip(ds["prompt_ids"], ds["completion_ids"], ds["label"], strict=True)]

    @staticmethod
    def _mismatched(items: Sequence[Example]) -> Sequences:
        partners = mismatched_partners([e.prompt_ids for e in items])
        # An item without a partner scores its own completion; `loss` leaves it out of z0.
        return [(e.prompt_ids, items[j if j is not None else i].completion_ids)
                for i, (e, j) in enumerate(zip(items, partners, strict=True))]

    def reference_sequences(self, items: Sequence[Example]) -> Sequences:
        return [(e.prompt_ids, e.completion_ids) for e in items] + self._mismatched(items)

    def sampler_logps(self, ds) -> tuple[torch.Tensor, list[int | None]]:
        n = len(ds["sample_logp"])
        # A mismatched pair was never sampled: its reference log-prob is always a forward pass.
        return torch.tensor(list(ds["sample_logp"]) + [0.0] * n), list(ds["sampler_round"]) + [None] * n

    def loss(self, policy_logps: PolicyLogps, items: Sequence[Example], idx: list[int],
             reference: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict]:
        n, total = len(idx), len(items)
        partners = mismatched_partners([e.prompt_ids for e in items])
        mismatched = [i for i in idx if partners[i] is not None]
        sequences = self.reference_sequences(items)
        # One forward for the completions and their mismatched pairs; z0 is a constant (detached).
        summed, lengths = policy_logps([sequences[i] for i in idx] + [sequences[total + i] for i in mismatched])
        ref = reference[torch.tensor(idx + [total + i for i in mismatched], device=reference.device)]
        logps = summed
        if self.cfg.length_normalize:
            logps, ref = length_normalized(summed, lengths), length_normalized(ref, lengths)
        z0 = kto_reference_point(logps[n:].detach(), ref[n:])
        desirable = torch.tensor([items[i].desirable for i in idx], device=logps.device)
        losses, rewards = kto_loss(logps[:n], ref[:n], desirable, beta=beta, reference_point=z0,
                                   desirable_weight=self.cfg.desirable_weight,
                                   undesirable_weight=self.cfg.undesirable_weight)
        loss = losses.mean()
        if self.cfg.nll_weight and desirable.any():
            loss = loss + self.cfg.nll_weight * nll_term(summed[:n][desirable], lengths[:n][desirable])
        _check_finite(loss, "KTO")
        above = rewards > beta * z0
        good, bad = rewards[desirable], rewards[~desirable]
        return loss, {"loss": loss.item(), "accuracy": (above == desirable).float().mean().item(),
                      "chosen_reward": good.mean().item() if len(good) else 0.0,
                      "rejected_reward": bad.mean().item() if len(bad) else 0.0,
                      "kto_reference_point": z0.item()}

    def summary(self, metrics: dict, items: Sequence) -> dict:
        return {**metrics, "reward_margin": metrics["chosen_reward"] - metrics["rejected_reward"],
                "train_pairs": 0, "train_examples": len(items)}

    def describe(self, columns: dict[str, list]) -> dict:
        desirable = sum(columns["label"])
        return {"pairs": len(columns["prompt"]), "examples": len(columns["prompt"]),
                "desirable": desirable, "undesirable": len(columns["label"]) - desirable}


Objective = PreferenceObjective | KTOObjective


def build_objective(cfg: LossConfig) -> Objective:
    return KTOObjective(cfg) if LossType(cfg.loss_type) is LossType.KTO else PreferenceObjective(cfg)
