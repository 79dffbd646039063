"""The trainer's models: tokenizer, trainable policy, frozen reference and pi_0, from one model folder."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoTokenizer

from online_dpo.config.compat import check_launch
from online_dpo.config.recipe import Recipe
from online_dpo.data.prompts import prompt_token_ids
from online_dpo.storage.model_files import resolve_model_path
from online_dpo.training.distributed import full_state_dict, load_models_whole
from online_dpo.training.logprobs import check_packing
from online_dpo.training.lora import AdapterDisabled, add_adapter, merged_state_dict
from online_dpo.training.losses import token_logps

# A fixed probe scored by both the trainer and the sampler after every sync
# (sampling/weight_sync.py). Any stale tensor in the sampler shows up as a log-prob mismatch.
PROBE_PROMPT = "Name a colour you can see in the sky."
PROBE_COMPLETION = "The sky is blue on a clear day, and orange or pink at sunset."


class Models:
    """Tokenizer, trainable policy and frozen reference, all from one model folder."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.model_dir = resolve_model_path(recipe.model.path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        if self.tokenizer.chat_template is None:
            raise ValueError(f"{self.model_dir}: the tokenizer has no chat template")
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),
            # Master weights stay fp32; CUDA computes in bf16 (bf16 on this CPU is ~9x slower).
            mixed_precision="bf16" if torch.cuda.is_available() else "no",
        )
        check_launch(recipe, self.accelerator)  # before loading: the checks are cheap, loads are not
        load_models_whole(self.accelerator)
        self.device = self.accelerator.device
        self.policy = self.load(self.model_dir).train()
        self.lora = recipe.train.lora
        if self.lora is not None:
            # One copy of the weights: the reference (= pi_0) is the policy with its adapter off.
            self.policy = add_adapter(self.policy, self.lora)
            self.reference = self.pi0 = AdapterDisabled(self.policy)
        else:
            self.reference = self.frozen_copy(self.policy)
            # pi_0 stays for KL-to-pi_0 and win rates; a fixed reference *is* pi_0, so share it.
            fixed = recipe.reference.schedule == "fixed"
            self.pi0 = self.reference if fixed else self.frozen_copy(self.policy)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        self.eos_ids = sorted({self.tokenizer.eos_token_id, *self._generation_eos()})
        self.padding_free = recipe.train.padding_free
        if self.padding_free:
            check_packing(self.policy, self.pad_id, self.device)

    def _generation_eos(self) -> list[int]:
        eos = getattr(self.policy.generation_config, "eos_token_id", None)
        return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))

    def load(self, folder: Path):
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(self.device)

    @staticmethod
    def frozen_copy(model):
        ref = copy.deepcopy(model).eval()
        ref.requires_grad_(False)
        return ref

    def set_reference(self, source_model) -> None:
        self.reference.load_state_dict(self.unwrapped_policy_state(source_model), strict=True)

    def unwrapped_policy_state(self, model=None) -> dict[str, torch.Tensor]:
        """Whole weights; every process must call it when training is sharded (a gather)."""
        model = model if model is not None else self.policy
        if self.lora is not None:
            return merged_state_dict(self.accelerator.unwrap_model(model))
        return full_state_dict(self.accelerator, model)

    def prompt_ids(self, prompt) -> list[int]:
        return prompt_token_ids(self.tokenizer, prompt)

    def probe_ids(self) -> tuple[list[int], list[int]]:
        completion = self.tokenizer(PROBE_COMPLETION, add_special_tokens=False).input_ids
        return self.prompt_ids(PROBE_PROMPT), completion + [self.tokenizer.eos_token_id]

    @torch.no_grad()
    def trainer_probe_logps(self, model) -> torch.Tensor:
        """The probe scored by `model`; a sharded policy's forward is collective."""
        prompt, completion = self.probe_ids()
        ids = torch.tensor([prompt + completion], device=self.device)
        model = self.accelerator.unwrap_model(model)
        was_training = model.training
        model.eval()
        logits = model(input_ids=ids).logits
        model.train(was_training)
        return token_logps(logits, ids)[0, len(prompt) - 1:].float().cpu()
