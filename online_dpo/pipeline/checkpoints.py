"""Policy and reference checkpoints under round_<k>/: save, restore and prune.

A policy checkpoint is whole float32 weights (so a resume is bit-identical) plus the tokenizer,
loadable by transformers, vLLM and `online-dpo eval`. Under LoRA (`AdapterCheckpoints`) the folder
holds the merged weights for everything downstream and the adapter alone under `adapter/`, which
is what a resume loads. The weights arrive as a stream (online_dpo/training/weight_stream.py) and
process 0 writes them as safetensors shards of `train.weight_bucket_mib`, one at a time; the
other processes only join each tensor's gather, so none holds the whole model. Every process
calls `save_policy`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from online_dpo.storage.artifacts import RunDir, write_dir_atomic
from online_dpo.storage.model_files import write_safetensors_shards
from online_dpo.training.lora import adapter_state, load_adapter, save_adapter
from online_dpo.training.weight_stream import buckets, drain

POLICY = "checkpoint"
REFERENCE = "reference_checkpoint"  # the EMA reference, whose state is not any round's policy
OPTIMIZER = "optimizer.pt"  # Adam's state in a policy checkpoint, when carried across rounds


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
        # Before the trainer prepares (shards) the policy: where it was loaded.
        policy.load_state_dict(self.models.load(folder, device=self.models.load_device).state_dict(), strict=True)

    def save_policy(self, k: int, policy, optimizer_state: dict | None = None) -> None:
        """`optimizer_state`: Adam's moments carried across rounds (train.carry_optimizer_state),
        saved beside the weights as optimizer.pt for a bit-identical resume."""
        stream = self.models.policy_weights(policy)  # collective when sharded: every process drains it
        extra = self._gather_extra(policy)
        if self.writer:
            def fill(tmp: Path) -> None:
                self._fill_policy(tmp, policy, stream, extra)
                if optimizer_state is not None:
                    torch.save(optimizer_state, tmp / OPTIMIZER)
            write_dir_atomic(self.run_dir.round(k) / POLICY, fill)
        else:
            drain(stream)

    def optimizer_state(self, k: int) -> dict:
        path = self.run_dir.round(k) / POLICY / OPTIMIZER
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: train.carry_optimizer_state needs Adam's state "
                                    f"from round {k}'s checkpoint to resume")
        return torch.load(path, map_location=self.models.device, weights_only=True)

    def _gather_extra(self, policy):
        """What the checkpoint holds beside the weights, gathered by every process (when sharded)."""
        return None

    def _fill_policy(self, tmp: Path, policy, stream, extra) -> None:
        # The stream leaves tied names out; loading re-ties them, as after save_pretrained.
        write_safetensors_shards(tmp, buckets(stream, self.models.recipe.train.weight_bucket_mib * 2**20))
        self.models.write_model_config(tmp)
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

    def _gather_extra(self, policy) -> dict:
        return adapter_state(self.models.accelerator.unwrap_model(policy))

    def _fill_policy(self, tmp: Path, policy, stream, adapter: dict) -> None:
        super()._fill_policy(tmp, policy, stream, adapter)  # the stream merges each adapted layer as it goes
        save_adapter(self.models.accelerator.unwrap_model(policy), tmp, adapter)


def build_checkpoints(run_dir: RunDir, models, writer: bool) -> Checkpoints:
    return (AdapterCheckpoints if models.lora is not None else Checkpoints)(run_dir, models, writer)
