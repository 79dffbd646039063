"""The trainer's models: tokenizer and trainable policy from one model folder, and frozen models
(pi_0, a reference) loaded from model folders when a step needs them.

Frozen models cost only what they must. No frozen copy is resident by default: pi_0 and a
reference that is some round's policy are read from their folders (the model folder, a round's
checkpoint) in the compute dtype for the step that scores with them, and freed after it
(`frozen`). The reference schedules (online_dpo/pipeline/reference_schedules.py) say which
folder; only the EMA reference, which is no folder's weights, stays resident. Under LoRA pi_0 is
the policy with its adapter off: no copy at all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from online_dpo.config.compat import check_launch
from online_dpo.config.recipe import Recipe
from online_dpo.data.prompts import prompt_token_ids
from online_dpo.storage.model_files import resolve_model_path, torch_dtype
from online_dpo.training.distributed import is_sharded, load_models_whole, reshard_root
from online_dpo.training.logprobs import check_packing
from online_dpo.training.lora import AdapterDisabled, add_adapter
from online_dpo.training.losses import token_logps
from online_dpo.training.memory import release_memory
from online_dpo.training.weight_stream import Stream, full_weights

# A fixed probe scored by both the trainer and the sampler after every sync
# (sampling/weight_sync.py). Any stale tensor in the sampler shows up as a log-prob mismatch.
PROBE_PROMPT = "Name a colour you can see in the sky."
PROBE_COMPLETION = "The sky is blue on a clear day, and orange or pink at sunset."


class Models:
    """Tokenizer and trainable policy from one model folder; frozen models on demand."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.model_dir = resolve_model_path(recipe.model.path, recipe.model.revision)
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
        kind = self.accelerator.distributed_type
        self.device = self.accelerator.device
        if self.device.type == "cuda":
            # TF32 for any float32 matmul left outside autocast: the bf16 compute already accepts
            # less precision than TF32's.
            torch.set_float32_matmul_precision("high")
        # Frozen models compute in the trainer's compute dtype: bf16 on CUDA; float32 on CPU.
        self.frozen_dtype = torch.bfloat16 if self.accelerator.mixed_precision == "bf16" else torch.float32
        # Where the policy is read: FSDP2 moves it to the accelerator one layer at a time as it
        # shards it (fully_shard, when the trainer prepares it), so no GPU ever holds it whole.
        self.load_device = torch.device("cpu") if kind == DistributedType.FSDP else self.device
        self.lora = recipe.train.lora
        if self.lora is None:
            self.policy = self.load(self.model_dir, device=self.load_device).train()  # float32 master weights
        else:
            # One copy of the weights, frozen in the compute dtype: pi_0 is the policy with its
            # adapter off. Only the adapter (float32) trains.
            base_dtype = torch_dtype(self.lora.base_dtype, self.device.type)
            self.policy = add_adapter(self.load(self.model_dir, base_dtype, self.load_device).train(), self.lora)
            self.adapter_off = AdapterDisabled(self.policy)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        self.eos_ids = sorted({self.tokenizer.eos_token_id, *self._generation_eos()})
        self.padding_free = recipe.train.padding_free
        if self.padding_free:
            check_packing(self.policy, self.pad_id, self.load_device)
        # pi_0's probe log-probs, for checking a fresh engine (which holds pi_0) without pi_0 resident;
        # the policy is still pi_0 here, whole on every process.
        self.pi0_probe = self.trainer_probe_logps(self.policy)

    def _generation_eos(self) -> list[int]:
        eos = getattr(self.policy.generation_config, "eos_token_id", None)
        return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))

    def load(self, folder: Path, dtype: torch.dtype = torch.float32, device: torch.device | None = None):
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device or self.device)

    @contextlib.contextmanager
    def frozen(self, folder: Path | None = None) -> Iterator[torch.nn.Module]:
        """The model of `folder` (default: pi_0's, the model folder), frozen in the compute dtype,
        for one step; freed when the step ends. Under LoRA pi_0 is the policy with its adapter off."""
        if folder is None and self.lora is not None:
            yield self.adapter_off
            return
        model = self.load(folder or self.model_dir, self.frozen_dtype).eval().requires_grad_(False)
        try:
            yield model
        finally:
            del model
            release_memory()

    def sharded_forward(self, model) -> bool:
        """Whether `model`'s forward is collective: the sharded policy, or its adapter-off base."""
        sharded = is_sharded(self.accelerator)
        return sharded and (model is self.policy or (self.lora is not None and model is self.adapter_off))

    def write_model_config(self, folder: Path) -> None:
        """config.json (float32: the master weights) and generation_config.json of a checkpoint.
        Written from the model folder's config, not through the policy: a sharded policy's own
        save_pretrained would start collectives on process 0 alone."""
        config = AutoConfig.from_pretrained(self.model_dir)
        config.dtype = "float32"
        config.save_pretrained(folder)
        policy = self.accelerator.unwrap_model(self.policy)
        (policy.get_base_model() if self.lora is not None else policy).generation_config.save_pretrained(folder)

    def policy_weights(self, model=None) -> Stream:
        """The policy's whole weights as a stream (online_dpo/training/weight_stream.py); every
        process must drain it when training is sharded (each tensor is a gather)."""
        return full_weights(self.accelerator, self.policy if model is None else model, lora=self.lora is not None)

    def unwrapped_policy_state(self, model=None) -> dict[str, torch.Tensor]:
        """Whole weights at once: for small models and tests; weight movement streams."""
        return dict(self.policy_weights(model))

    def prompt_ids(self, prompt) -> list[int]:
        return prompt_token_ids(self.tokenizer, prompt)

    def probe_ids(self) -> tuple[list[int], list[int]]:
        completion = self.tokenizer(PROBE_COMPLETION, add_special_tokens=False).input_ids
        return self.prompt_ids(PROBE_PROMPT), completion + [self.tokenizer.eos_token_id]

    @torch.no_grad()
    def trainer_probe_logps(self, model) -> torch.Tensor:
        """The probe scored by `model` (or `model` itself, when it is already a probe's log-probs
        such as `pi0_probe`); a sharded policy's forward is collective."""
        if isinstance(model, torch.Tensor):
            return model
        prompt, completion = self.probe_ids()
        # The policy before the trainer prepares it may sit elsewhere (`load_device`).
        param = next(iter(model.parameters()), None)
        ids = torch.tensor([prompt + completion], device=self.device if param is None else param.device)
        model = self.accelerator.unwrap_model(model)
        was_training = model.training
        model.eval()
        logits = model(input_ids=ids).logits
        model.train(was_training)
        reshard_root(model)
        return token_logps(logits, ids)[0, len(prompt) - 1:].float().cpu()

