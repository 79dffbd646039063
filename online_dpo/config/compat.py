"""Which recipe settings go together: checked once the recipe's own keys are valid.

`check_recipe` runs at load time (config.recipe_from_dict): combinations of sections that the
pipeline cannot honour, and every judge the recipe names, imported (not built) so a typo in a
judge target fails before any model loads, and every tracker in `report_to`, its package found
(online_dpo/analysis/trackers.py). `check_launch` adds the checks that depend on how the
run was launched (`accelerate launch` with DDP, FSDP or DeepSpeed). Every refusal names the keys.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch
from accelerate.utils import DistributedType

from judges.loading import JudgeLoadError, validate_judge_target
from online_dpo.analysis.trackers import check_trackers
from online_dpo.config.errors import RecipeError
from online_dpo.training.distributed import REPLICATED

# Recipes arrive here as online_dpo.config.recipe.Recipe (and JudgeConfig) objects. They go unannotated:
# recipe.py runs these checks at load time, so this module must not import it back.

# Losses on pairs whose labels cDPO's label smoothing models as flipped with some probability.
SMOOTHED_LOSSES = ("sigmoid", "robust")


def check_recipe(recipe) -> None:
    """Refuse combinations the pipeline cannot honour, and resolve every judge the recipe names."""
    _check_sections(recipe)
    _check_generation(recipe.generation)
    _check_lengths(recipe)
    _check_kto(recipe)
    check_trackers(recipe.report_to)  # each named once, its package installed
    judge = resolve_judge(recipe.judge, "judge")
    for key, cfg in (("eval.judge", recipe.eval.judge), ("eval.win_rate_judge", recipe.eval.win_rate_judge)):
        if cfg is not None:
            resolve_judge(cfg, key)
    pointwise = callable(getattr(judge, "score", None))
    if needs_pointwise_judge(recipe) and inspect.isclass(judge) and not pointwise:
        raise RecipeError(
            f"loss.loss_type: kto labels every sample by its score; judge.target {recipe.judge.target} "
            "is not a pointwise judge (it has no score(row, completion) method)"
        )


def _check_sections(recipe) -> None:
    if recipe.train.lora is not None and recipe.reference.schedule != "fixed":
        raise RecipeError(
            f"train.lora: needs reference.schedule: fixed (the reference is the base model with the "
            f"adapter disabled), got {recipe.reference.schedule!r}"
        )
    if recipe.generation.max_staleness and recipe.mode == "offline":
        raise RecipeError("generation.max_staleness: offline mode samples nothing per round (its pairs are "
                          "fixed, or pi_0's); it applies to mode online and fully_online")
    if recipe.loss.target_kl is not None and recipe.eval.every != 1:
        raise RecipeError(f"eval.every: adaptive beta (loss.target_kl) reads the held-out KL every round; "
                          f"needs eval.every: 1, got {recipe.eval.every}")
    if recipe.loss.label_smoothing > 0 and recipe.loss.loss_type not in SMOOTHED_LOSSES:
        raise RecipeError(
            f"loss.label_smoothing: only loss.loss_type {' and '.join(SMOOTHED_LOSSES)} use it (cDPO); "
            f"loss.loss_type {recipe.loss.loss_type} would ignore label_smoothing "
            f"{recipe.loss.label_smoothing}: set it to 0"
        )
    if recipe.mode == "fully_online" and recipe.pairs.replay_ratio > 0:
        raise RecipeError(f"pairs.replay_ratio: mode fully_online trains one optimizer step of fresh pairs "
                          f"per round; replayed pairs would make more steps; got {recipe.pairs.replay_ratio}")
    if recipe.mode == "fully_online" and recipe.loss.loss_type == "kto":
        raise RecipeError("loss.loss_type: kto labels up to generation.samples_per_prompt examples per "
                          "prompt, so mode fully_online could not keep one optimizer step per round; "
                          "use mode: online")
    if recipe.mode != "offline" and recipe.data.pairs is not None:
        raise RecipeError(f"data.pairs is read only by mode: offline (this recipe has mode: "
                          f"{recipe.mode}, which samples its pairs); remove data.pairs or set mode: offline")


def _check_generation(g) -> None:
    if (g.backend == "vllm_server") != (g.server is not None):
        raise RecipeError("generation.server: needed by generation.backend: vllm_server, and read by it alone "
                          f"(generation.backend is {g.backend!r}, generation.server is "
                          f"{'set' if g.server is not None else 'unset'})")
    if g.backend == "vllm_server" and g.engines != "process0":
        raise RecipeError("generation.engines: every_process builds an engine in every training process; "
                          "with generation.backend: vllm_server the engine is the server: use process0")
    if g.sleep and g.backend != "vllm":
        raise RecipeError(f"generation.sleep: only an in-process vLLM engine sleeps (generation.backend: "
                          f"vllm), not {g.backend!r}")


def prompt_token_limit(recipe) -> int:
    """The longest prompt (in tokens) the sampler can take with room for a whole completion."""
    g = recipe.generation
    return recipe.data.max_prompt_tokens or g.max_model_len - g.max_tokens


def _check_lengths(recipe) -> None:
    g, limit = recipe.generation, recipe.data.max_prompt_tokens
    if g.max_tokens >= g.max_model_len:
        raise RecipeError(f"generation.max_tokens: {g.max_tokens} leaves no room for a prompt within "
                          f"generation.max_model_len {g.max_model_len}")
    if limit is not None and limit + g.max_tokens > g.max_model_len:
        raise RecipeError(f"data.max_prompt_tokens: {limit} prompt tokens plus generation.max_tokens "
                          f"{g.max_tokens} exceed generation.max_model_len {g.max_model_len}: such a "
                          "prompt would overflow the sampler")


def _check_kto(recipe) -> None:
    """KTO trains on single samples, each labelled by its own score, not on pairs."""
    if recipe.loss.loss_type != "kto":
        return
    if recipe.pairs.replay_ratio > 0:
        raise RecipeError(f"pairs.replay_ratio: loss.loss_type kto trains on single labelled samples, "
                          f"not pairs, so there are no pairs to replay; got {recipe.pairs.replay_ratio}")
    if recipe.pairs.strategy == "random":
        raise RecipeError("pairs.strategy: random judges one pair per prompt, but loss.loss_type kto "
                          "labels every sample by its score: use best_vs_worst")


def needs_pointwise_judge(recipe) -> bool:
    """KTO labels samples by score unless a labelled dataset (offline data.pairs) is given."""
    return recipe.loss.loss_type == "kto" and not (recipe.mode == "offline" and recipe.data.pairs)


def resolve_judge(cfg, key: str) -> Any:
    """Import the judge class `cfg.target` and check `cfg.kwargs` fit it, without building it.
    `key` is where the judge sits in the recipe ("judge" or "eval.judge")."""
    try:
        return validate_judge_target(cfg.target, cfg.kwargs)
    except JudgeLoadError as e:
        message = str(e)
        if message.startswith("judge.kwargs"):
            raise RecipeError(f"{key}.kwargs{message.removeprefix('judge.kwargs')}") from None
        raise RecipeError(f"{key}.target: {message.removeprefix('judge.target ')}") from None


# ---------------------------------------------------------------------------- launch


def check_launch(recipe, accelerator) -> None:
    """Refuse recipe settings the launch's distributed setup cannot run (before any model loads)."""
    kind = accelerator.distributed_type
    g = recipe.generation
    local_vllm = [key for key, cfg in (("judge", recipe.judge), ("eval.judge", recipe.eval.judge),
                                       ("eval.win_rate_judge", recipe.eval.win_rate_judge))
                  if cfg is not None and cfg.kwargs.get("backend") == "vllm"]
    if accelerator.num_processes > 1 and local_vllm:
        # The same wait as below: a vLLM engine that process 0 alone builds never starts.
        raise RuntimeError(f"{local_vllm[0]}.kwargs.backend: vllm (a local vLLM judge on process 0) hangs "
                           f"under {accelerator.num_processes} processes; serve the judge with `vllm serve` "
                           "and use backend: http")
    if accelerator.num_processes > 1 and g.backend == "vllm" and g.engines == "process0":
        # vLLM adopts the run's process group and waits, while building its engine, for every
        # process to build one: process 0 alone would wait forever.
        raise RuntimeError("generation.engines: process0 with generation.backend: vllm hangs under "
                           f"{accelerator.num_processes} processes (vLLM's engine start waits for every "
                           "process); set generation.engines: every_process")
    if g.sleep and not torch.cuda.is_available():
        raise RuntimeError("generation.sleep: needs CUDA (vLLM's sleep mode frees GPU memory); "
                           "this machine has no GPU: set generation.sleep: false")
    if recipe.train.carry_optimizer_state and kind not in REPLICATED:
        raise RuntimeError(f"train.carry_optimizer_state under {kind.value} is not supported: Adam's state is "
                           "sharded, and its checkpoint is written for one process's whole state; "
                           "launch with recipes/accelerate/ddp.yaml or leave it off")
    if kind in REPLICATED:
        asked_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
        if asked_fsdp and accelerator.is_main_process:
            print(f"[online-dpo] warning: accelerate runs FSDP on accelerators only; this run is "
                  f"{kind.value} (weights not sharded)", flush=True)
        return
    if kind == DistributedType.FSDP:
        if accelerator.state.fsdp_plugin.fsdp_version != 2:
            raise RuntimeError("FSDP1 is not supported: set fsdp_version: 2 in the accelerate config "
                               "(recipes/accelerate/fsdp.yaml)")
        if recipe.reference.schedule == "ema":
            raise RuntimeError("reference.schedule: ema with FSDP is not supported (the EMA update "
                               "reads the sharded policy on one process); use fixed or swap")
        return
    if kind == DistributedType.DEEPSPEED:
        _check_deepspeed(recipe, accelerator)
        return
    raise RuntimeError(
        f"{kind} is not supported by the round pipeline; launch with recipes/accelerate/ddp.yaml "
        "(data-parallel), recipes/accelerate/fsdp.yaml (sharded, FSDP2) or "
        "recipes/accelerate/deepspeed_zero{2,3}.yaml"
    )


def _check_deepspeed(recipe, accelerator) -> None:
    plugin = accelerator.state.deepspeed_plugin
    if recipe.train.lora is not None:
        raise RuntimeError("train.lora with DeepSpeed is not supported: launch it with "
                           "recipes/accelerate/fsdp.yaml (the frozen base sharded) or ddp.yaml")
    if plugin.deepspeed_config.get("fp16", {}).get("enabled") is True:
        # A dynamic loss scale skips the steps that overflow, silently: a resumed round would no
        # longer match an uninterrupted one, and a skipped round trains nothing.
        raise RuntimeError("DeepSpeed fp16 is not supported: use mixed_precision bf16 (or no)")
    config = plugin.deepspeed_config.get("zero_optimization", {})
    offloaded = [key for key in ("offload_optimizer", "offload_param")
                 if config.get(key, {}).get("device", "none") not in ("none", None)]
    if offloaded:
        # DeepSpeed offloads Adam only to its own CPU Adam (a compiled op) and refuses the
        # trainer's torch AdamW at prepare time; nothing here has been run with it.
        raise RuntimeError(f"DeepSpeed {' and '.join(offloaded)} to CPU is not supported (DeepSpeed "
                           "refuses the trainer's torch AdamW with an offloaded optimizer): set "
                           "offload_optimizer_device and offload_param_device to none")
    if plugin.zero_stage == 3:
        if plugin.zero3_init_flag:  # distributed.load_models_whole says why the run cannot honour it
            raise RuntimeError("DeepSpeed ZeRO-3 with zero3_init_flag: true is not supported: set "
                               "zero3_init_flag: false (recipes/accelerate/deepspeed_zero3.yaml)")
        if recipe.reference.schedule == "ema":
            raise RuntimeError("reference.schedule: ema with ZeRO-3 is not supported (the EMA update "
                               "reads the sharded policy on one process); use fixed or swap")
