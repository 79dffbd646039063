"""Policy and reference checkpoints under round_<k>/: save, restore and prune.

A policy checkpoint is whole weights plus the tokenizer, loadable by transformers, vLLM and
`online-dpo eval`. Under LoRA (`AdapterCheckpoints`) the folder holds the merged weights for
everything downstream and the adapter alone under `adapter/`, which is what a resume loads.
Gathering sharded weights is collective, so every process calls `save_policy`; only process 0
writes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from online_dpo.storage.artifacts import RunDir, write_dir_atomic
from online_dpo.training.lora import load_adapter, merged_state_dict, save_adapter

POLICY = "checkpoint"
REFERENCE = "reference_checkpoint"  # the EMA reference, whose state is not any round's policy


class Checkpoints:
    def __init__(self, run_dir: RunDir, models, writer: bool):
        self.run_dir = run_dir
        self.models = models
        self.writer = writer  # process 0

    def latest_policy(self) -> int:
        """The newest round that trained and saved a policy (a round without pairs saves none)."""
        k = self.run_dir.latest_with("train.json")
        while k and not (self.run_dir.round(k) / POLICY).exists():
            k = self.run_dir.latest_with("train.json", before=k)
        return k

    def restore_policy(self, policy) -> int:
        k = self.latest_policy()
        if k:
            print(f"[online-dpo] resuming: policy from round_{k}/{POLICY}", flush=True)
            self._load_policy(policy, self.run_dir.round(k) / POLICY)
        return k

    def load_into(self, model, k: int, name: str = POLICY) -> None:
        folder = self.run_dir.round(k) / name
        model.load_state_dict(self.models.load(folder).state_dict(), strict=True)

    def _load_policy(self, policy, folder: Path) -> None:
        policy.load_state_dict(self.models.load(folder).state_dict(), strict=True)

    def save_policy(self, k: int, policy) -> None:
        state = self._policy_state(policy)  # collective when sharded: every process gathers
        if self.writer:
            write_dir_atomic(self.run_dir.round(k) / POLICY, lambda tmp: self._fill_policy(tmp, policy, state))

    def _policy_state(self, policy):
        return self.models.unwrapped_policy_state(policy)

    def _fill_policy(self, tmp: Path, policy, state) -> None:
        self.models.checkpoint_template().save_pretrained(tmp, state_dict=state, safe_serialization=True)
        self.models.tokenizer.save_pretrained(tmp)

    def save_reference(self, k: int, reference) -> None:
        if self.writer:
            def fill(tmp: Path) -> None:
                reference.save_pretrained(tmp, safe_serialization=True)
                self.models.tokenizer.save_pretrained(tmp)
            write_dir_atomic(self.run_dir.round(k) / REFERENCE, fill)

    def prune(self, k: int, keep: int | None, protect: int | None) -> None:
        """Keep the newest `keep` of each kind (all when None), and the policy checkpoint of round
        `protect`, which the swapped reference was loaded from and a resume reloads."""
        if keep is None or not self.writer:
            return
        for name in (POLICY, REFERENCE):
            existing = [j for j in range(1, k + 1) if (self.run_dir.round(j) / name).exists()]
            for j in existing[:-keep]:
                if not (name == POLICY and j == protect):
                    shutil.rmtree(self.run_dir.round(j) / name)


class AdapterCheckpoints(Checkpoints):
    """LoRA: merged weights for everything downstream, and the adapter for resume."""

    def _load_policy(self, policy, folder: Path) -> None:
        load_adapter(policy, folder)

    def _policy_state(self, policy):
        return None  # LoRA runs are never sharded; the merge happens while writing

    def _fill_policy(self, tmp: Path, policy, state) -> None:
        peft_model = self.models.accelerator.unwrap_model(policy)
        peft_model.get_base_model().save_pretrained(tmp, state_dict=merged_state_dict(peft_model),
                                                    safe_serialization=True)
        save_adapter(peft_model, tmp)
        self.models.tokenizer.save_pretrained(tmp)


def build_checkpoints(run_dir: RunDir, models, writer: bool) -> Checkpoints:
    return (AdapterCheckpoints if models.lora is not None else Checkpoints)(run_dir, models, writer)
