"""DPO updates on a round's pairs: one forward over chosen+rejected, AdamW, clipping, accumulation."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from online_dpo.config import LossConfig, TrainConfig
from online_dpo.distributed import describe, prepare_deepspeed_config, uses_deepspeed
from online_dpo.faults import maybe_kill
from online_dpo.losses import dpo_loss, kto_loss
from online_dpo.packing import pack, packed_logps, prompt_groups, scored_token_logps


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


def collate(sequences: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad (prompt, completion) token lists; the mask marks completion tokens only."""
    width = max(len(p) + len(c) for p, c in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    completion = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (prompt, comp) in enumerate(sequences):
        n = len(prompt) + len(comp)
        ids[row, :n] = torch.tensor(prompt + comp)
        attention[row, :n] = 1
        completion[row, len(prompt):n] = 1
    return {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}


def pair_sequences(pairs: Sequence[Pair]) -> list[tuple[list[int], list[int]]]:
    """Chosen rows first, then rejected rows: one forward pass scores both sides."""
    return [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]


def batch_logps(model, batch: dict[str, torch.Tensor], average: bool = False) -> torch.Tensor:
    """Summed (or mean) completion log-probs of a right-padded batch, one per row."""
    target = batch["completion_mask"][:, 1:].bool()  # position t predicts token t+1
    rows, cols = target.nonzero(as_tuple=True)
    index = rows * batch["input_ids"].shape[1] + cols
    per_token = scored_token_logps(model, batch["input_ids"], index, batch["input_ids"][:, 1:][target],
                                   attention_mask=batch["attention_mask"])
    summed = per_token.new_zeros(len(target)).index_add(0, rows, per_token)
    return summed / target.sum(-1).clamp(min=1) if average else summed


def completion_logps(model, sequences: Sequence[tuple[list[int], list[int]]], pad_id: int,
                     device: torch.device, padding_free: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs and completion lengths of sequences, in one forward pass."""
    if padding_free:
        return packed_logps(model, pack(sequences, pad_id).to(device))
    batch = {k: v.to(device) for k, v in collate(sequences, pad_id).items()}
    return batch_logps(model, batch), batch["completion_mask"][:, 1:].sum(-1)


@torch.no_grad()
def score_sequences(model, sequences: Sequence[tuple[list[int], list[int]]], pad_id: int,
                    device: torch.device, batch_size: int = 8, average: bool = False,
                    padding_free: bool = True) -> torch.Tensor:
    """Summed (or mean) completion log-probs of many sequences under a frozen model, in batches."""
    # Sequences of one prompt (a pair's two sides, a prompt's samples) go into the same batch,
    # where the packer computes their prompt once.
    order = [i for group in prompt_groups(sequences) for i in group]
    out = torch.zeros(len(sequences))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        summed, lengths = completion_logps(model, [sequences[i] for i in idx], pad_id, device, padding_free)
        out[idx] = (summed / lengths.clamp(min=1) if average else summed).float().cpu()
    return out


class DPOTrainer:
    def __init__(self, policy, loss: LossConfig, train: TrainConfig, pad_id: int,
                 accelerator: Accelerator):
        self.loss_cfg = loss
        self.cfg = train
        self.pad_id = pad_id
        self.accelerator = accelerator
        if train.gradient_checkpointing:
            policy.gradient_checkpointing_enable()
        # Trainable parameters only: with LoRA, Adam keeps moments for the adapter alone.
        optimizer = torch.optim.AdamW(
            [p for p in policy.parameters() if p.requires_grad], lr=train.learning_rate,
            weight_decay=train.weight_decay,
        )
        self.deepspeed = uses_deepspeed(accelerator)
        if self.deepspeed:
            prepare_deepspeed_config(accelerator, train)
        self.policy, self.optimizer = accelerator.prepare(policy, optimizer)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def train_round(self, pairs: Sequence[Pair], reference_chosen: torch.Tensor,
                    reference_rejected: torch.Tensor, seed: int, tag: str = "",
                    beta: float | None = None, on_step: Callable[[int], None] | None = None) -> dict:
        """One round of DPO on fresh pairs; returns metrics averaged over all micro-batches."""
        def micro(idx, weight):
            return self._micro_step(pairs, idx, reference_chosen, reference_rejected, weight)

        metrics = self._optimize(len(pairs), self.cfg.micro_batch_pairs, micro, seed, tag, beta, on_step)
        metrics["reward_margin"] = metrics["chosen_reward"] - metrics["rejected_reward"]
        return {**metrics, "train_pairs": len(pairs)}

    def train_round_kto(self, examples: Sequence[Example], reference_logps: torch.Tensor,
                        seed: int, tag: str = "", beta: float | None = None,
                        on_step: Callable[[int], None] | None = None) -> dict:
        """One round of KTO on single labelled completions (2 per pair-slot of a micro-batch)."""
        def micro(idx, weight):
            return self._kto_micro_step(examples, idx, reference_logps, weight)

        metrics = self._optimize(len(examples), 2 * self.cfg.micro_batch_pairs, micro, seed, tag, beta, on_step)
        metrics["reward_margin"] = metrics["chosen_reward"] - metrics["rejected_reward"]
        return {**metrics, "train_pairs": 0, "train_examples": len(examples)}

    def _optimize(self, n: int, micro_size: int, micro, seed: int, tag: str, beta, on_step) -> dict:
        """The shared loop: epochs of seeded shuffles, gradient accumulation, clipping, AdamW.

        Adam moments restart every round: each round is a new problem against the current
        reference, and it makes a resumed round identical to an uninterrupted one.
        """
        self.beta = self.loss_cfg.beta if beta is None else beta  # adaptive beta moves it per round
        self.optimizer.optimizer.state.clear()
        self.policy.train()
        cfg, acc = self.cfg, self.accelerator
        # Under `accelerate launch` each optimizer step's items are split across processes
        # (same seeded order everywhere, so the shards are disjoint) and DDP averages gradients.
        world, rank = acc.num_processes, acc.process_index
        per_step = micro_size * cfg.grad_accum_steps * world
        gen = torch.Generator().manual_seed(seed)
        totals: dict[str, float] = {}
        micro_batches, step, t0 = 0, 0, time.perf_counter()
        grad_norms = []
        bar = tqdm(total=cfg.epochs * math.ceil(n / per_step), desc=f"{tag} train", leave=False, unit="step",
                   disable=not acc.is_local_main_process)
        for _ in range(cfg.epochs):
            order = torch.randperm(n, generator=gen).tolist()
            for s in range(0, len(order), per_step):
                step_idx = order[s:s + per_step]
                local = step_idx[rank::world]
                # Every process runs the same number of backward passes (each one all-reduces);
                # one that is short of items repeats an item with weight 0.
                n_micro = math.ceil(math.ceil(len(step_idx) / world) / micro_size)
                for m in range(n_micro):
                    idx = local[m * micro_size:(m + 1) * micro_size]
                    # Scale so a step's gradient is the mean over all its items, whatever the split
                    # (DDP divides the all-reduced sum by `world`).
                    weight = len(idx) * world / len(step_idx)
                    sync = m == n_micro - 1
                    with contextlib.nullcontext() if sync else acc.no_sync(self.policy):
                        loss, out = micro(idx or step_idx[:1], weight)
                        self._backward(loss, last_of_step=sync)
                    for k, v in out.items():  # every key on every process, so the reduce lines up
                        totals[k] = totals.get(k, 0.0) + (v if idx else 0.0)
                    micro_batches += bool(idx)
                grad_norms.append(self._step())
                step += 1
                if on_step is not None:
                    on_step(step)  # e.g. the EMA reference update
                bar.update(1)
                if micro_batches:
                    bar.set_postfix(loss=f"{totals['loss'] / micro_batches:.4f}")
                maybe_kill(f"{tag}/train_step_{step}")
        bar.close()
        self.policy.eval()
        if world > 1:  # metrics are means over every process's micro-batches
            keys = sorted(totals)
            summed = acc.reduce(torch.tensor([totals[k] for k in keys] + [micro_batches], dtype=torch.float64,
                                             device=acc.device), reduction="sum").tolist()
            totals, micro_batches = dict(zip(keys, summed[:-1])), int(summed[-1])
        metrics = {k: v / max(micro_batches, 1) for k, v in totals.items()}
        metrics.update(optimizer_steps=step, grad_norm=sum(grad_norms) / max(len(grad_norms), 1),
                       train_seconds=time.perf_counter() - t0, processes=world, distributed=describe(acc))
        return metrics

    def _backward(self, loss: torch.Tensor, last_of_step: bool) -> None:
        if self.deepspeed:
            # The engine's own calls, not accelerate's backward (which steps the engine after every
            # micro-batch unless accelerate's accumulation counter drives the loop): the step's
            # last backward is the accumulation boundary, where ZeRO reduces the gradients.
            self.policy.set_gradient_accumulation_boundary(last_of_step)
            self.policy.backward(loss)
        else:
            self.accelerator.backward(loss)

    def _step(self) -> float:
        """Clip, step, zero; returns the gradient norm before clipping."""
        if self.deepspeed:
            self.policy.step()  # clips at gradient_clipping (= train.max_grad_norm), steps AdamW, zeroes
            norm = self.policy.get_global_grad_norm()  # None when DeepSpeed did not need it
            return float("nan") if norm is None else float(norm)
        norm = self.accelerator.clip_grad_norm_(self.policy.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def _logps(self, sequences) -> tuple[torch.Tensor, torch.Tensor]:
        with self.accelerator.autocast():
            return completion_logps(self.policy, sequences, self.pad_id, self.device, self.cfg.padding_free)

    def _kto_micro_step(self, examples, idx, reference_logps, weight) -> tuple[torch.Tensor, dict]:
        chosen = [examples[i] for i in idx]
        logps, _ = self._logps([(e.prompt_ids, e.completion_ids) for e in chosen])
        ref = reference_logps[idx].to(self.device)
        desirable = torch.tensor([e.desirable for e in chosen], device=self.device)
        # Reference point z0: the batch's mean log-ratio (detached), a cheap stand-in for the
        # paper's KL estimate on mismatched completions.
        z0 = (logps - ref).mean()
        losses, rewards = kto_loss(logps, ref, desirable, beta=self.beta, kl=z0,
                                   desirable_weight=self.loss_cfg.desirable_weight,
                                   undesirable_weight=self.loss_cfg.undesirable_weight)
        loss = losses.mean()
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"non-finite KTO loss {loss.item()}; lower train.learning_rate")
        above = rewards > self.beta * z0.detach().clamp(min=0)
        good, bad = rewards[desirable], rewards[~desirable]
        return loss * weight, {
            "loss": loss.item(), "accuracy": (above == desirable).float().mean().item(),
            "chosen_reward": good.mean().item() if len(good) else 0.0,
            "rejected_reward": bad.mean().item() if len(bad) else 0.0,
        }

    def _micro_step(self, pairs, idx, reference_chosen, reference_rejected, weight) -> tuple[torch.Tensor, dict]:
        """The weighted loss to backpropagate, and the micro-batch's metrics."""
        n = len(idx)
        summed, lengths = self._logps(pair_sequences([pairs[i] for i in idx]))
        lengths = lengths.clamp(min=1)
        logps = summed / lengths if self.loss_cfg.length_normalize else summed
        ref_c = reference_chosen[idx].to(self.device)
        ref_r = reference_rejected[idx].to(self.device)
        if self.loss_cfg.length_normalize:
            ref_c, ref_r = ref_c / lengths[:n], ref_r / lengths[n:]
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            logps[:n], logps[n:], ref_c, ref_r,
            beta=self.beta, loss_type=self.loss_cfg.loss_type,
            label_smoothing=self.loss_cfg.label_smoothing,
        )
        loss = losses.mean()
        nll = -(summed[:n] / lengths[:n]).mean()
        if self.loss_cfg.nll_weight:
            loss = loss + self.loss_cfg.nll_weight * nll
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite DPO loss {loss.item()} (policy logps {logps.tolist()}); "
                "lower train.learning_rate or loss.beta. The last good checkpoint is kept."
            )
        return loss * weight, {
            "loss": loss.item(),
            "accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
            "chosen_reward": chosen_rewards.mean().item(),
            "rejected_reward": rejected_rewards.mean().item(),
            "chosen_nll": nll.item(),
        }
