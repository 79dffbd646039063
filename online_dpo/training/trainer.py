"""The optimizer loop of a round: seeded epochs, gradient accumulation, clipping, AdamW, data
parallelism. What is trained on and the loss come from the objective (online_dpo/pipeline/objectives.py)."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from online_dpo.config.recipe import LossConfig, TrainConfig
from online_dpo.faults import maybe_kill
from online_dpo.training.distributed import describe, prepare_deepspeed_config, uses_deepspeed
from online_dpo.training.logprobs import completion_logps
from online_dpo.training.lr_schedule import RunSchedule
from online_dpo.training.memory import release_memory


class DPOTrainer:
    def __init__(self, policy, loss: LossConfig, train: TrainConfig, pad_id: int,
                 accelerator: Accelerator, schedule: RunSchedule | None = None):
        self.loss_cfg = loss
        self.cfg = train
        # The learning rate of each step over the whole run (default: train.learning_rate throughout).
        self.schedule = schedule or RunSchedule("constant", 0.0, 1, train.learning_rate)
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
        release_memory()  # sharding freed each process's whole copy of the policy: give it back

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def train_round(self, objective, items: Sequence, reference: torch.Tensor, seed: int, tag: str = "",
                    beta: float | None = None, on_step: Callable[[int], None] | None = None,
                    round_k: int = 1) -> dict:
        """One round of `objective` on `items` against `reference` (the objective's reference log-probs
        of its `reference_sequences(items)`); metrics are means over all micro-batches."""
        beta = self.loss_cfg.beta if beta is None else beta  # adaptive beta moves it per round
        # Dropout (e.g. train.lora.dropout) draws from the global generator: seeded per round, so a
        # resumed round draws the masks an uninterrupted one did.
        torch.manual_seed(seed)
        reference = reference.to(self.device)

        def micro(idx, weight):
            return self._micro_step(objective, items, idx, reference, beta, weight)

        micro_size = objective.items_per_slot * self.cfg.micro_batch_pairs
        return objective.summary(self._optimize(len(items), micro_size, micro, seed, tag, on_step, round_k), items)

    def _micro_step(self, objective, items, idx, reference, beta, weight) -> tuple[torch.Tensor, dict]:
        """The micro-batch's loss scaled by its share of the step (0 for a padding repeat), and its metrics."""
        loss, metrics = objective.loss(self._logps, items, idx, reference, beta)
        return loss * weight, metrics

    def _optimize(self, n: int, micro_size: int, micro, seed: int, tag: str, on_step, round_k: int) -> dict:
        """The shared loop: epochs of seeded shuffles, gradient accumulation, clipping, AdamW.

        Adam moments restart every round unless train.carry_optimizer_state: each round is a new
        problem against the current reference (a carried state is saved with the checkpoint, so a
        resumed round is identical to an uninterrupted one either way).
        """
        if not self.cfg.carry_optimizer_state:
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
        grad_norms, rates = [], []
        steps = cfg.epochs * math.ceil(n / per_step)
        bar = tqdm(total=steps, desc=f"{tag} train", leave=False, unit="step", disable=not acc.is_local_main_process)
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
                rates.append(self.schedule.rate(round_k, step, steps))
                for group in self.optimizer.param_groups:
                    group["lr"] = rates[-1]
                grad_norms.append(self._step())
                step += 1
                if on_step is not None:
                    on_step(step)  # e.g. the EMA reference update
                bar.update(1)
                if micro_batches:
                    bar.set_postfix(loss=f"{totals['loss'] / micro_batches:.4f}")
                maybe_kill(f"{tag}/train_step_{step}")
        bar.close()
        # Free Adam's moments now rather than at the next round's start: sampling, judging, the sync
        # and the next reference scoring then never hold 8 bytes per parameter they do not use.
        if not cfg.carry_optimizer_state:
            self.optimizer.optimizer.state.clear()
        release_memory()
        self.policy.eval()
        if world > 1:  # metrics are means over every process's micro-batches
            keys = sorted(totals)
            summed = acc.reduce(torch.tensor([totals[k] for k in keys] + [micro_batches], dtype=torch.float64,
                                             device=acc.device), reduction="sum").tolist()
            totals, micro_batches = dict(zip(keys, summed[:-1])), int(summed[-1])
        metrics = {k: v / max(micro_batches, 1) for k, v in totals.items()}
        metrics.update(optimizer_steps=step, grad_norm=sum(grad_norms) / max(len(grad_norms), 1), learning_rates=rates,
                       train_seconds=time.perf_counter() - t0, processes=world, distributed=describe(acc))
        return metrics

    def optimizer_state(self) -> dict | None:
        """Adam's moments to carry into the next round (train.carry_optimizer_state), else None."""
        return self.optimizer.optimizer.state_dict() if self.cfg.carry_optimizer_state else None

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.optimizer.load_state_dict(state)

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
