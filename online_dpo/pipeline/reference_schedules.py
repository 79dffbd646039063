"""Reference schedules, chosen once from `reference.schedule` (and LoRA).

A schedule owns everything about the reference that changes over a run: what a resumed run
restores, the per-optimizer-step hook, the update after a round, its own checkpoint, whether
log-probs the sampler returned may stand in for a reference forward pass (only when the
reference *is* the policy that sampled them), and where the reference's weights are when a step
scores with it. A round's reference log-probs are all computed before its first optimizer step
(`scoring`), so only the EMA reference, which moves during training, must stay resident. The
others are a folder (pi_0's, or the checkpoint of the round the reference was swapped to), loaded
in the compute dtype for the step and freed; when the reference is the policy as it stands (a
swap every round, before training), the policy itself scores, and no copy exists at all.

- `FixedReference`: pi_0 throughout (standard DPO).
- `AdapterOffReference`: LoRA's reference, the base model with the adapter disabled (= pi_0).
- `SwapReference`: becomes the policy every `swap_every_rounds` rounds (iterative DPO, Xiong et
  al. 2024; Xu et al. 2023).
- `EMAReference`: every `ema_every_steps` optimizer steps, ref <- rate * policy + (1 - rate) * ref
  (TR-DPO's soft update, Gorbatovski et al. 2024). A blend is never any sampling policy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import torch

from online_dpo.config.recipe import Recipe
from online_dpo.pipeline.checkpoints import POLICY, REFERENCE, Checkpoints
from online_dpo.storage.artifacts import RunDir, read_json


@torch.no_grad()
def soft_update(reference: torch.nn.Module, policy: torch.nn.Module, alpha: float) -> None:
    """ref <- alpha * policy + (1 - alpha) * ref, parameter by parameter, in place."""
    for ref_p, pol_p in zip(reference.parameters(), policy.parameters(), strict=True):
        ref_p.lerp_(pol_p.detach().to(ref_p.dtype), alpha)


@contextlib.contextmanager
def policy_as_reference(models, policy) -> Iterator[torch.nn.Module]:
    """The policy itself, in eval mode and the trainer's autocast, scoring as the reference (every
    process calls it: a sharded policy's forward is collective)."""
    module = models.accelerator.unwrap_model(policy)  # DDP's inner module; FSDP2 shards in place
    was_training = module.training
    module.eval()
    try:
        with models.accelerator.autocast():
            yield module
    finally:
        module.train(was_training)


class FixedReference:
    name = "fixed"

    def __init__(self, models):
        self.models = models

    @property
    def is_pi0(self) -> bool:
        return True

    def scoring(self, policy, policy_round: int) -> AbstractContextManager[torch.nn.Module]:
        """The reference for this round's log-probs, before its first optimizer step."""
        return self.models.frozen()  # pi_0, loaded for the step (LoRA: the adapter switched off)

    def at_eval(self) -> AbstractContextManager[torch.nn.Module]:
        """The reference as it stands after training, for the held-out KL (process 0 alone)."""
        return self.models.frozen()

    def restore(self) -> None:
        """pi_0 was copied before the policy was restored; nothing to load."""

    def step_hook(self, k: int, policy) -> Callable[[int], None] | None:
        return None

    def after_training(self, k: int) -> None:
        pass

    def update(self, k: int, policy, policy_round: int) -> dict:
        return {"schedule": self.name, "source_round": 0}

    def may_reuse_sampler(self, sampler_round: int | None) -> bool:
        return sampler_round == 0

    def protected_checkpoint(self) -> int | None:
        return None


class AdapterOffReference(FixedReference):
    """LoRA: the reference shares the policy's base weights, which training never touches."""

    name = "lora_adapter_off"


class SwapReference(FixedReference):
    name = "swap"

    def __init__(self, models, run_dir: RunDir, checkpoints: Checkpoints, every_rounds: int):
        super().__init__(models)
        self.run_dir, self.checkpoints, self.every = run_dir, checkpoints, every_rounds
        self.source_round = 0  # the round whose policy is the reference; 0 = pi_0

    @property
    def is_pi0(self) -> bool:
        return self.source_round == 0

    def restore(self) -> None:
        k = self.run_dir.latest_with("reference.json")
        self.source_round = read_json(self.run_dir.round(k) / "reference.json")["source_round"] if k else 0

    def _folder(self):
        """pi_0's folder (None: the model folder), or the checkpoint the reference was swapped to,
        which pruning keeps (`protected_checkpoint`)."""
        return self.run_dir.round(self.source_round) / POLICY if self.source_round else None

    def scoring(self, policy, policy_round: int) -> AbstractContextManager[torch.nn.Module]:
        if policy_round == self.source_round:  # untrained since the swap: the policy *is* the reference
            return policy_as_reference(self.models, policy)
        return self.models.frozen(self._folder())

    def at_eval(self) -> AbstractContextManager[torch.nn.Module]:
        # Never the policy: evaluation runs on process 0 alone, where a sharded forward would hang.
        return self.models.frozen(self._folder())

    def update(self, k: int, policy, policy_round: int) -> dict:
        # The policy of the newest round that trained: a round without pairs changed nothing, but it
        # must not cancel the swap of a policy an earlier round of the period trained. Its weights
        # are already in its checkpoint, so a swap moves no weights.
        if k % self.every == 0 and policy_round > self.source_round:
            self.source_round = policy_round
        return {"schedule": self.name, "source_round": self.source_round}

    def may_reuse_sampler(self, sampler_round: int | None) -> bool:
        return sampler_round == self.source_round

    def protected_checkpoint(self) -> int | None:
        return self.source_round or None


class EMAReference(FixedReference):
    name = "ema"

    def __init__(self, models, run_dir: RunDir, checkpoints: Checkpoints, every_steps: int, rate: float):
        super().__init__(models)
        self.run_dir, self.checkpoints = run_dir, checkpoints
        self.every, self.rate = every_steps, rate
        self.moved = False  # still pi_0 until the first soft update
        # Resident, and float32 like the master weights: a bf16 blend would round small updates
        # (rate x step) away. Read from pi_0's folder: the policy may already be sharded.
        self.model = models.load(models.model_dir).eval().requires_grad_(False)

    def scoring(self, policy, policy_round: int) -> AbstractContextManager[torch.nn.Module]:
        return contextlib.nullcontext(self.model)

    def at_eval(self) -> AbstractContextManager[torch.nn.Module]:
        return contextlib.nullcontext(self.model)

    @property
    def is_pi0(self) -> bool:
        return not self.moved

    def restore(self) -> None:
        # The reference moves inside training; its state is saved with each round's train.json.
        k = self.run_dir.latest_with(REFERENCE)
        while k and not self.run_dir.done(k, "train"):  # killed between its save and train.json
            k = self.run_dir.latest_with(REFERENCE, before=k)
        if k:
            self.checkpoints.load_into(self.model, k, REFERENCE)
            self.moved = self._steps_before(k + 1) >= self.every

    def _steps_before(self, k: int) -> int:
        """Optimizer steps of rounds 1..k-1: `every` counts over the whole run, across rounds."""
        return sum(read_json(self.run_dir.round(j) / "train.json").get("optimizer_steps", 0)
                   for j in range(1, k) if self.run_dir.done(j, "train"))

    def step_hook(self, k: int, policy) -> Callable[[int], None]:
        before = self._steps_before(k)
        policy = self.models.accelerator.unwrap_model(policy)

        def on_step(step: int) -> None:
            if (before + step) % self.every == 0:
                soft_update(self.model, policy, self.rate)
                self.moved = True
        return on_step

    def after_training(self, k: int) -> None:
        self.checkpoints.save_reference(k, self.model)

    def update(self, k: int, policy, policy_round: int) -> dict:
        return {"schedule": self.name, "source_round": None}

    def may_reuse_sampler(self, sampler_round: int | None) -> bool:
        return False


Reference = FixedReference | SwapReference | EMAReference


def build_reference(recipe: Recipe, models, run_dir: RunDir, checkpoints: Checkpoints) -> Reference:
    cfg = recipe.reference
    if models.lora is not None:  # the compatibility check allows only `fixed` with LoRA
        return AdapterOffReference(models)
    if cfg.schedule == "swap":
        return SwapReference(models, run_dir, checkpoints, cfg.swap_every_rounds)
    if cfg.schedule == "ema":
        return EMAReference(models, run_dir, checkpoints, cfg.ema_every_steps, cfg.ema_rate)
    return FixedReference(models)
