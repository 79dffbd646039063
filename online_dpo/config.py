"""Recipe configs: small frozen dataclasses loaded from YAML with `key=value` overrides.

Every field has a docstring-style comment. Unknown keys and ill-typed values fail at load time
and name the dotted key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class RecipeError(ValueError):
    """A recipe is malformed; the message names the offending key."""


@dataclass(frozen=True)
class ModelConfig:
    path: str = "smollm2"
    """Policy weights: "smollm2" (the embedded SmolLM2-135M-Instruct) or a local HF model folder."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """"auto" is float32 on CPU (bf16 is ~9x slower there) and bfloat16 on CUDA."""


@dataclass(frozen=True)
class GenerationConfig:
    backend: Literal["vllm", "transformers"] = "vllm"
    """Sampling engine. Chosen explicitly; there is no silent fallback."""
    n: int = 4
    """Completions sampled per prompt."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 64
    """Completion length cap; a completion that hits it counts as not ending in EOS."""
    probe_tolerance: float | None = None
    """Max |sampler - trainer| per-token log-prob on the probe after each weight sync. None: 2e-3
    for a float32 sampler, 0.1 for a bfloat16 one (the trainer scores in float32)."""
    kv_cache_gib: int = 1
    """vLLM CPU KV cache size (VLLM_CPU_KVCACHE_SPACE)."""
    gpu_memory_utilization: float = 0.4
    """vLLM GPU memory share, leaving room for the trainer on the same device."""
    tensor_parallel_size: int = 1
    """vLLM tensor parallelism: shard the sampler over this many GPUs of the node (CUDA only)."""
    cpu_top_p_without_sort: bool = True
    """vllm-cpu: find each row's top-p nucleus among its largest probabilities instead of sorting
    the whole vocabulary every decode step (online_dpo/generation/top_p.py); false: vLLM's sort."""


@dataclass(frozen=True)
class JudgeConfig:
    target: str
    """The judge class as "module:Class" (or "module.Class")."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the judge's constructor."""
    max_failure_rate: float = 0.5
    """Stop the run when more than this share of a round's prompts get a failed judgment."""
    retries: int = 2
    """Extra attempts after a judge call raises, times out or answers garbage."""
    timeout_s: float | None = None
    """Give up on one judge call after this many seconds (then retry)."""
    backoff_s: float = 0.5
    """Sleep before retry i is backoff_s * 2**(i-1)."""
    both_orders: bool = False
    """Ask a pairwise judge in both orders; disagreement becomes `disagreement`."""
    disagreement: Literal["tie", "failed"] = "tie"
    max_length_ratio: float | None = None
    """Length control: a winner more than this many times longer than the loser is a tie."""
    cache: bool = True
    """Keep successful judgments in runs/<name>/judge_cache.jsonl; a resumed run reuses them."""


@dataclass(frozen=True)
class PairsConfig:
    strategy: Literal["best_vs_worst", "random"] = "best_vs_worst"
    """best_vs_worst ranks all n samples by a pointwise judge; random judges one random pair."""
    replay_ratio: float = 0.0
    """Add this many earlier-round pairs per fresh pair (0.5: one old pair for every two new)."""


@dataclass(frozen=True)
class LossConfig:
    beta: float = 0.1
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "kto"] = "sigmoid"
    """kto trains on single completions labelled good/bad (from a pointwise judge's score
    against `kto_threshold`, or from a dataset's `label` column) instead of pairs."""
    label_smoothing: float = 0.0
    """cDPO: the assumed probability that a label is flipped (robust / sigmoid)."""
    length_normalize: bool = False
    """Use mean instead of summed token log-probs per sequence."""
    nll_weight: float = 0.0
    """Weight of an NLL term on the chosen completion (RPO-style)."""
    kto_threshold: float | None = None
    """KTO: a score >= threshold is desirable. Unset: above its prompt's mean score (equal: dropped)."""
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    target_kl: float | None = None
    """Adaptive beta: after each round, move beta to keep KL-to-reference near this (nats)."""
    beta_adapt_rate: float = 0.5


@dataclass(frozen=True)
class AdapterConfig:
    """LoRA (peft): only the adapter trains, and the reference is the base model with the adapter
    disabled, so one copy of the weights is in memory."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: str = "all-linear"
    """peft's target_modules: "all-linear", or a regex over module names."""


@dataclass(frozen=True)
class TrainConfig:
    learning_rate: float = 1e-5
    epochs: int = 1
    """Passes over the round's fresh pairs."""
    micro_batch_pairs: int = 4
    """Pairs per forward pass (chosen and rejected go through one pass together)."""
    grad_accum_steps: int = 1
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    gradient_checkpointing: bool = False
    padding_free: bool = True
    """Pack sequences into rows with restarting position ids instead of padding them (verified
    against a padded forward once per run; turn off for an architecture that fails the check)."""
    lora: AdapterConfig | None = None
    """Set (e.g. `train.lora: {rank: 16}`) to train a LoRA adapter instead of all weights."""


@dataclass(frozen=True)
class ReferenceConfig:
    schedule: Literal["fixed", "swap", "ema"] = "swap"
    """fixed: stays pi_0. swap: becomes the policy every `every` rounds. ema: every `every`
    optimizer steps, ref <- alpha * policy + (1 - alpha) * ref (TR-DPO)."""
    every: int = 1
    alpha: float = 0.1
    cache_logps: bool = True
    """Keep pi_0's reference log-probs in ~/.cache/online_dpo/reference_logps, keyed by the model's
    bytes, dtype, library versions and token ids: a sweep on one offline dataset scores it once."""


@dataclass(frozen=True)
class DataConfig:
    prompts: str
    """A jsonl/json/parquet/csv file (or save_to_disk folder) with a `prompt` column."""
    prompts_per_round: int = 16
    eval_prompts: int = 8
    """Held-out prompts (taken from the end of the file) scored after every round."""
    pairs: str | None = None
    """Offline mode: a prompt/chosen/rejected dataset. Unset: pairs are sampled once from pi_0."""


@dataclass(frozen=True)
class EvalConfig:
    judge: JudgeConfig | None = None
    """The judge for held-out evaluation; unset means the training judge. A different one
    keeps a run from being graded by its own teacher."""
    samples_per_prompt: int = 2
    win_rate_vs_pi0: bool = True
    """Judge held-out samples against pi_0's (both orders, ties count half) every evaluated round."""
    every: int = 1
    """Evaluate every N rounds and always on the last one; 0: the last round only. Held-out
    sampling, its judging and two KL forwards cost a tenth to a fifth of a short round."""


@dataclass(frozen=True)
class Recipe:
    name: str
    """Run name; artifacts go to <output_dir>/<name>/."""
    rounds: int
    judge: JudgeConfig
    data: DataConfig
    mode: Literal["online", "offline"] = "online"
    """online: sample and judge fresh pairs each round. offline: train on a fixed dataset."""
    seed: int = 0
    output_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    keep_checkpoints: int | None = None
    """Keep only the last N round checkpoints (plus the reference's); unset keeps all."""

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


# ---------------------------------------------------------------------------- loading


def _check_value(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise RecipeError(f"{key}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(tp)):
            return None
        if len(args) == 1:
            return _check_value(key, value, args[0])
        for arg in args:
            try:
                return _check_value(key, value, arg)
            except RecipeError:
                continue
        raise RecipeError(f"{key}: {value!r} does not match {tp}")
    if tp is type(None):
        if value is not None:
            raise RecipeError(f"{key}: expected null, got {value!r}")
        return None
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is float:
        # YAML reads 1e-5 as a string; accept ints and numeric strings for floats.
        if isinstance(value, bool):
            raise RecipeError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise RecipeError(f"{key}: expected a number, got {value!r}") from None
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise RecipeError(f"{key}: unsupported field type {tp}")


def _build(cls: type, data: Any, prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise RecipeError(f"{prefix or 'recipe'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise RecipeError(
            f"unknown key {where}{unknown[0]} (known: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _check_value(key, data[name], hints[name])
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(f"missing required key {key}")
    obj = cls(**kwargs)
    _validate(obj, prefix)
    return obj


def _validate(obj: Any, prefix: str) -> None:
    """Range checks that types alone cannot express."""
    positive = {
        Recipe: ["rounds"],
        GenerationConfig: ["n", "max_tokens", "kv_cache_gib", "tensor_parallel_size"],
        TrainConfig: ["learning_rate", "epochs", "micro_batch_pairs", "grad_accum_steps"],
        ReferenceConfig: ["every"],
        AdapterConfig: ["rank", "alpha"],
        DataConfig: ["prompts_per_round"],
        JudgeConfig: ["backoff_s"],
        EvalConfig: ["samples_per_prompt"],
        LossConfig: ["beta"],
    }.get(type(obj), [])
    for name in positive:
        if getattr(obj, name) <= 0:
            key = f"{prefix}.{name}" if prefix else name
            raise RecipeError(f"{key}: must be > 0, got {getattr(obj, name)!r}")
    if isinstance(obj, Recipe) and obj.train.lora is not None and obj.reference.schedule != "fixed":
        raise RecipeError(
            f"train.lora: needs reference.schedule: fixed (the reference is the base model with the "
            f"adapter disabled), got {obj.reference.schedule!r}"
        )
    if isinstance(obj, GenerationConfig) and obj.probe_tolerance is not None and obj.probe_tolerance <= 0:
        raise RecipeError(f"{prefix}.probe_tolerance: must be > 0, got {obj.probe_tolerance}")
    if isinstance(obj, GenerationConfig) and not 0 < obj.top_p <= 1:
        raise RecipeError(f"{prefix}.top_p: must be in (0, 1], got {obj.top_p}")
    if isinstance(obj, LossConfig) and not 0 <= obj.label_smoothing < 0.5:
        raise RecipeError(f"{prefix}.label_smoothing: must be in [0, 0.5), got {obj.label_smoothing}")
    if isinstance(obj, JudgeConfig):
        if obj.retries < 0:
            raise RecipeError(f"{prefix}.retries: must be >= 0, got {obj.retries}")
        if not 0 <= obj.max_failure_rate <= 1:
            raise RecipeError(f"{prefix}.max_failure_rate: must be in [0, 1], got {obj.max_failure_rate}")
        for name in ("timeout_s", "max_length_ratio"):
            value = getattr(obj, name)
            if value is not None and value <= 0:
                raise RecipeError(f"{prefix}.{name}: must be > 0, got {value}")
    if isinstance(obj, ReferenceConfig) and not 0 < obj.alpha <= 1:
        raise RecipeError(f"{prefix}.alpha: must be in (0, 1], got {obj.alpha}")
    if isinstance(obj, LossConfig) and obj.target_kl is not None and obj.target_kl <= 0:
        raise RecipeError(f"{prefix}.target_kl: must be > 0, got {obj.target_kl}")
    if isinstance(obj, EvalConfig) and obj.every < 0:
        raise RecipeError(f"{prefix}.every: must be >= 0, got {obj.every}")
    if isinstance(obj, Recipe) and obj.loss.target_kl is not None and obj.eval.every != 1:
        raise RecipeError(f"eval.every: adaptive beta (loss.target_kl) reads the held-out KL every round; "
                          f"needs eval.every: 1, got {obj.eval.every}")
    if isinstance(obj, PairsConfig) and obj.replay_ratio < 0:
        raise RecipeError(f"{prefix}.replay_ratio: must be >= 0, got {obj.replay_ratio}")
    if isinstance(obj, Recipe) and obj.keep_checkpoints is not None and obj.keep_checkpoints < 1:
        raise RecipeError(f"keep_checkpoints: must be >= 1, got {obj.keep_checkpoints}")
    if isinstance(obj, Recipe) and obj.generation.n < 2:
        raise RecipeError("generation.n: need at least 2 samples per prompt to form a pair")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides; values are parsed as YAML scalars."""
    data = _deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override {key}: {part} is not a mapping")
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return data


def _deepcopy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deepcopy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy(v) for v in data]
    return data


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RecipeError(f"recipe file not found: {path}") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: invalid YAML: {e}") from None
    return recipe_from_dict(apply_overrides(data or {}, list(overrides)), base_dir=path.parent)


def recipe_from_dict(data: dict, base_dir: Path | None = None) -> Recipe:
    recipe = _build(Recipe, data)
    if base_dir is not None:
        # Data paths in a recipe are relative to the recipe file, so recipes run from any cwd.
        for name in ("prompts", "pairs"):
            value = getattr(recipe.data, name)
            if value is None or Path(value).is_absolute() or Path(value).exists():
                continue
            candidate = base_dir / value
            if candidate.exists():
                recipe = dataclasses.replace(
                    recipe, data=dataclasses.replace(recipe.data, **{name: str(candidate)})
                )
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)
