"""Recipe configs: small frozen pydantic models loaded from YAML with `key=value` overrides.

Every field has a docstring. Unknown keys, renamed keys, ill-typed and out-of-range values fail
at load time with a `RecipeError` that names the dotted key, so a typo never silently falls back
to a default. Checks that combine several sections live in online_dpo/config/compat.py, run at load.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from online_dpo.config.base import Bool, Float, Int, Section, Str
from online_dpo.config.compat import check_recipe
from online_dpo.config.data import DataConfig, PromptSource
from online_dpo.config.errors import RecipeError
from online_dpo.config.generation import GenerationConfig, ServerConfig, ServerLaunchConfig

# Re-exported: callers catch config.RecipeError and name every section from here.
__all__ = ["RecipeError", "GenerationConfig", "ServerConfig", "ServerLaunchConfig"]


class ModelConfig(Section):
    path: Str = "smollm2"
    """Policy weights: "smollm2" (the embedded SmolLM2-135M-Instruct), a local HF model folder, or
    a hub ID ("org/name") in the HF cache."""
    revision: Str | None = None
    """A hub ID's branch, tag or commit (default: main)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """"auto" is float32 on CPU (bf16 is ~9x slower there) and bfloat16 on CUDA."""


class JudgeConfig(Section):
    RENAMED: ClassVar[dict[str, str]] = {"max_length_ratio": "pairs.max_length_ratio"}

    target: Str
    """The judge class as "module:Class" (or "module.Class"); resolved (imported) at load."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for the judge's constructor."""
    max_failure_rate: Float = Field(0.5, ge=0, le=1)
    """Stop the run when more than this share of a round's prompts get a failed judgment."""
    retries: Int = Field(2, ge=0)
    """Extra attempts after a judge call raises, times out or answers garbage."""
    timeout_s: Float | None = Field(None, gt=0)
    """Give up on one judge call after this many seconds (then retry)."""
    backoff_s: Float = Field(0.5, gt=0)
    """Sleep before retry i is backoff_s * 2**(i-1)."""
    both_orders: Bool = False
    """Ask a pairwise judge in both orders; disagreement becomes `disagreement`."""
    disagreement: Literal["tie", "failed"] = "tie"
    cache: Bool = True
    """Keep successful judgments in runs/<name>/judge_cache.jsonl; a resumed run reuses them."""
    concurrency: Int | None = Field(None, gt=0)
    """Prompts judged at once (each prompt's calls stay in order). None: the judge class's own
    `concurrency` attribute (LLMJudge over HTTP: 16; a model in this process: 1), else 1."""


class PairsConfig(Section):
    strategy: Literal["best_vs_worst", "random"] = "best_vs_worst"
    """best_vs_worst ranks all samples by a pointwise judge; random judges one random pair."""
    replay_ratio: Float = Field(0.0, ge=0)
    """Add this many earlier-round pairs per fresh pair (0.5: one old pair for every two new)."""
    max_length_ratio: Float | None = Field(None, gt=0)
    """Length control: a winner more than this many times longer than the loser is a tie."""


class LossConfig(Section):
    beta: Float = Field(0.1, gt=0)
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "kto"] = "sigmoid"
    """kto trains on single completions labelled good/bad (from a pointwise judge's score
    against `kto_threshold`, or from a dataset's `label` column) instead of pairs."""
    label_smoothing: Float = Field(0.0, ge=0, lt=0.5)
    """cDPO: the assumed probability that a label is flipped (robust / sigmoid)."""
    length_normalize: Bool = False
    """Use mean instead of summed token log-probs per sequence."""
    nll_weight: Float = Field(0.0, ge=0)
    """Weight of an NLL term on the chosen completion (RPO-style)."""
    kto_threshold: Float | None = None
    """KTO: a score >= threshold is desirable. Unset: above its prompt's mean score (equal: dropped)."""
    desirable_weight: Float = Field(1.0, gt=0)
    undesirable_weight: Float = Field(1.0, gt=0)
    target_kl: Float | None = Field(None, gt=0)
    """Adaptive beta: after each round, move beta to keep KL-to-reference near this (nats)."""
    beta_adapt_rate: Float = Field(0.5, gt=0, le=1)


class AdapterConfig(Section):
    """LoRA (peft): only the adapter trains, and the reference is the base model with the adapter
    disabled, so one copy of the weights is in memory."""

    rank: Int = Field(16, gt=0)
    alpha: Float = Field(32.0, gt=0)
    """peft's lora_alpha: the adapter's update is scaled by alpha / rank."""
    dropout: Float = Field(0.0, ge=0, lt=1)
    target_modules: Str = "all-linear"
    """peft's target_modules: "all-linear", or a regex over module names."""
    base_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """The frozen base's dtype: "auto" is the compute dtype (bfloat16 on CUDA, float32 on CPU,
    where bf16 is ~9x slower). The adapter and its Adam state stay float32."""


class TrainConfig(Section):
    learning_rate: Float = Field(1e-5, gt=0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    """The learning rate over the whole run's optimizer steps (transformers' schedulers; see
    online_dpo/training/lr_schedule.py). Constant by default: an online run's rounds are each a new
    problem, and a decay ties the rate of every round to `rounds`, so such a run cannot be extended."""
    warmup_ratio: Float = Field(0.0, ge=0, lt=1)
    """The share of the run over which the rate warms up linearly from 0."""
    carry_optimizer_state: Bool = False
    """Keep Adam's moments across rounds (saved with each checkpoint as optimizer.pt, so a resume
    is bit-identical). Off: they restart every round and are freed while the round samples."""
    epochs: Int = Field(1, gt=0)
    """Passes over the round's fresh pairs (mode fully_online: derived, 1)."""
    micro_batch_pairs: Int = Field(4, gt=0)
    """Pairs per forward pass (chosen and rejected go through one pass together)."""
    grad_accum_steps: Int = Field(1, gt=0)
    max_grad_norm: Float = Field(1.0, gt=0)
    weight_decay: Float = Field(0.0, ge=0)
    gradient_checkpointing: Bool = False
    padding_free: Bool = True
    """Pack sequences into rows with restarting position ids instead of padding them (verified
    against a padded forward once per run; turn off for an architecture that fails the check)."""
    lora: AdapterConfig | None = None
    """Set (e.g. `train.lora: {rank: 16}`) to train a LoRA adapter instead of all weights."""
    weight_bucket_mib: Int = Field(512, gt=0)
    """Weights move as a stream (sync, checkpoint), gathered one tensor at a time when sharded;
    a server's transfer files and the checkpoint's safetensors shards hold at most this much."""


class ReferenceConfig(Section):
    RENAMED: ClassVar[dict[str, str]] = {
        "every": "reference.swap_every_rounds (schedule swap) or reference.ema_every_steps (schedule ema)",
        "alpha": "reference.ema_rate",
    }

    schedule: Literal["fixed", "swap", "ema"] = "swap"
    """fixed: stays pi_0. swap: becomes the policy every `swap_every_rounds` rounds. ema: every
    `ema_every_steps` optimizer steps, ref <- ema_rate * policy + (1 - ema_rate) * ref (TR-DPO)."""
    swap_every_rounds: Int = Field(1, gt=0)
    """schedule swap: the reference becomes the policy after every this many rounds."""
    ema_every_steps: Int = Field(1, gt=0)
    """schedule ema: soft-update the reference after every this many optimizer steps."""
    ema_rate: Float = Field(0.1, gt=0, le=1)
    """schedule ema: the policy's share in each soft update (1: a swap)."""
    cache_logps: Bool = True
    """Keep pi_0's reference log-probs in ~/.cache/online_dpo/reference_logps, keyed by the model's
    bytes, dtype, library versions and token ids: a sweep on one offline dataset scores it once."""

    @model_validator(mode="after")
    def _keys_of_the_schedule(self):
        # A key of another schedule would be ignored in silence (resolved recipes hold every key
        # at its default, so only a changed value can tell that a user set it).
        owners = {"swap_every_rounds": "swap", "ema_every_steps": "ema", "ema_rate": "ema"}
        for key, owner in owners.items():
            if owner != self.schedule and getattr(self, key) != type(self).model_fields[key].default:
                raise PydanticCustomError("schedule_key", "reference.{key} is read by reference.schedule {owner} "
                                          "only; this recipe has schedule {schedule}: remove it",
                                          {"key": key, "owner": owner, "schedule": self.schedule})
        return self


class EvalConfig(Section):
    judge: JudgeConfig | None = None
    """The judge for held-out evaluation; unset means the training judge. A different one
    keeps a run from being graded by its own teacher."""
    win_rate_judge: JudgeConfig | None = None
    """The judge of the win rate against pi_0; unset means the eval judge. One that does not see
    what the eval judge scores (the instruction-following showcase's constraints) tells whether
    the gain cost the answers their quality."""
    samples_per_prompt: Int = Field(2, gt=0)
    win_rate_vs_pi0: Bool = True
    """Judge held-out samples against pi_0's (both orders, ties count half) every evaluated round."""
    every: Int = Field(1, ge=0)
    """Evaluate every N rounds and always on the last one; 0: the last round only. Held-out
    sampling, its judging and two KL forwards cost a tenth to a fifth of a short round."""


class Recipe(Section):
    name: Str
    """Run name; artifacts go to <output_dir>/<name>/."""
    rounds: Int = Field(gt=0)
    judge: JudgeConfig
    data: DataConfig
    mode: Literal["online", "offline", "fully_online"] = "online"
    """online: sample and judge fresh pairs each round. offline: train on a fixed dataset
    (data.pairs, or pairs sampled once from pi_0). fully_online: online with one optimizer step per
    round; data.prompts_per_round and train.epochs are derived."""
    seed: Int = 0
    output_dir: Str = "runs"
    model: ModelConfig = Field(default_factory=ModelConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    pairs: PairsConfig = Field(default_factory=PairsConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    keep_checkpoints: Int | None = Field(None, ge=1)
    """Keep only the last N round checkpoints (plus the reference's); unset keeps all."""
    report_to: list[Literal["tensorboard", "wandb", "trackio", "mlflow"]] = Field(default_factory=list)
    """Experiment trackers fed each round's metrics and pairs, in <run dir>/trackers/ (analysis/trackers.py)."""

    @model_validator(mode="before")
    @classmethod
    def _derive_fully_online(cls, data: Any) -> Any:
        """fully_online: one optimizer step per round. The derived keys are filled in; a recipe
        may repeat them (a resolved recipe re-read on resume does) but not contradict them."""
        if not isinstance(data, dict) or data.get("mode") != "fully_online":
            return data
        train, section = _plain(data.get("train", {})), _plain(data.get("data"))
        if train is None or section is None:
            return data  # field validation names the problem
        defaults = TrainConfig.model_fields
        micro = train.get("micro_batch_pairs", defaults["micro_batch_pairs"].default)
        accum = train.get("grad_accum_steps", defaults["grad_accum_steps"].default)
        if type(micro) is not int or type(accum) is not int:
            return data
        derived = [(section, "data.prompts_per_round", micro * accum,
                    f"train.micro_batch_pairs * train.grad_accum_steps = {micro * accum}"),
                   (train, "train.epochs", 1, "1")]
        for node, key, value, how in derived:
            name = key.split(".")[1]
            if name in node and type(node[name]) is not int:
                continue  # field validation names it
            if name in node and node[name] != value:
                raise PydanticCustomError("recipe", "{message}", {"message": (
                    f"{key}: mode fully_online takes one optimizer step per round, so {key} is "
                    f"{how}; got {node[name]!r} (leave it unset)")})
            node[name] = value
        return {**data, "train": train, "data": section}

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def _plain(node: Any) -> dict | None:
    """A section as a fresh dict of the keys it sets, or None if it is not a mapping."""
    if isinstance(node, BaseModel):
        return node.model_dump(exclude_unset=True)
    return dict(node) if isinstance(node, dict) else None


# ---------------------------------------------------------------------------- errors

_EXPECTED = {
    "int_type": "expected an integer", "int_parsing": "expected an integer",
    "int_from_float": "expected an integer", "float_type": "expected a number",
    "float_parsing": "expected a number", "finite_number": "expected a finite number",
    "bool_type": "expected true/false", "bool_parsing": "expected true/false",
    "string_type": "expected a string", "dict_type": "expected a mapping",
    "model_type": "expected a mapping", "model_attributes_type": "expected a mapping",
}
_BOUNDS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="),
           "less_than": ("lt", "<"), "less_than_equal": ("le", "<=")}


def _number(x: Any) -> Any:
    return int(x) if isinstance(x, float) and x.is_integer() else x


def _error_message(err: dict) -> str:
    """One pydantic error as "dotted.key: what was wrong"."""
    loc = [str(p) for p in err["loc"] if not str(p).startswith("<")]  # a union's tag (config/data.py)
    key, kind, ctx, value = ".".join(loc), err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "missing":
        return f"missing required key {key}"
    if kind == "unknown_key":
        return f"unknown key {'.'.join([*loc, ctx['key']])} (known: {ctx['known']})"
    if kind == "renamed":
        return f"{'.'.join([*loc, ctx['old']])} was renamed {ctx['new']}"
    if kind == "recipe":
        return ctx["message"]
    where = key or "recipe"
    if kind in _EXPECTED:
        got = type(value).__name__ if "mapping" in _EXPECTED[kind] else repr(value)
        return f"{where}: {_EXPECTED[kind]}, got {got}"
    if kind in _BOUNDS:
        name, op = _BOUNDS[kind]
        return f"{where}: must be {op} {_number(ctx[name])}, got {value!r}"
    if kind == "literal_error":
        return f"{where}: {value!r} is not one of {ctx['expected']}"
    if kind == "value_error":
        return f"{where}: {ctx.get('error', err['msg'])}"
    return f"{where}: {err['msg']}, got {value!r}"


def _recipe_error(e: ValidationError) -> RecipeError:
    return RecipeError("; ".join(_error_message(err) for err in e.errors(include_url=False)))


# ---------------------------------------------------------------------------- loading


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides; values are parsed as YAML scalars."""
    if not isinstance(data, dict):
        raise RecipeError(f"recipe: expected a mapping, got {type(data).__name__}")
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            if node.get(part) is None:  # absent or null (e.g. train.lora): start a mapping
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise RecipeError(f"override {key}: {part} is not a mapping")
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return data


def read_yaml(path: Path, what: str) -> Any:
    """A YAML file's content; a missing file or bad YAML is a RecipeError naming the file."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise RecipeError(f"{what} not found: {path}") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: invalid YAML: {e}") from None


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    path = Path(path)
    data = read_yaml(path, "recipe file")
    return recipe_from_dict(apply_overrides(data or {}, list(overrides)), base_dir=path.parent)


def recipe_from_dict(data: dict, base_dir: Path | None = None) -> Recipe:
    """Validate a recipe mapping, resolve its data paths and check it (online_dpo.config.compat).

    Raises RecipeError naming the dotted key of each problem found."""
    if not isinstance(data, dict):
        raise RecipeError(f"recipe: expected a mapping, got {type(data).__name__}")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise _recipe_error(e) from None
    if base_dir is not None:
        # Data paths in a recipe are relative to the recipe file, so recipes run from any cwd.
        # (An HF dataset name stays as it is: no such file exists beside the recipe.)
        data = recipe.data
        for name in ("prompts", "pairs", "eval_prompts"):
            value = getattr(data, name)
            source = value if isinstance(value, PromptSource) else None
            path = source.path if source is not None else value
            if not isinstance(path, str) or Path(path).is_absolute() or Path(path).exists():
                continue
            candidate = Path(base_dir) / path
            if candidate.exists():
                moved = source.model_copy(update={"path": str(candidate)}) if source else str(candidate)
                data = data.model_copy(update={name: moved})
        recipe = recipe.model_copy(update={"data": data})
    check_recipe(recipe)
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict:
    """Plain nested dicts of every key, defaults and derived values included."""
    return recipe.model_dump()
