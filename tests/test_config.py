from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from online_dpo.config.recipe import (
    GenerationConfig,
    Recipe,
    RecipeError,
    TrainConfig,
    load_recipe,
    recipe_from_dict,
    recipe_to_dict,
)

REPO = Path(__file__).resolve().parents[1]
# recipes/accelerate/ holds `accelerate launch` configs, not recipes (tested in test_distributed);
# recipes/sweeps/ holds sweep files (tested in test_sweep).
RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml")
                 if "accelerate" not in p.parts and "sweeps" not in p.parts)


def minimal(**extra):
    data = {"name": "x", "rounds": 2, "judge": {"target": "judges.rules:ConciseAnswerJudge"},
            "data": {"prompts": "p.jsonl"}}
    data.update(extra)
    return data


class PairwiseOnly:
    """A judge that compares two completions and cannot score one."""

    def judge(self, row, first, second):
        raise NotImplementedError


PAIRWISE = {"target": "tests.test_config:PairwiseOnly"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_recipe_loads_and_resolves_its_judges(path, monkeypatch):
    import judges.loading
    import online_dpo.config.compat

    resolved = []
    real = judges.loading.validate_judge_target

    def spy(target, kwargs):
        resolved.append(target)
        return real(target, kwargs)

    monkeypatch.setattr(online_dpo.config.compat, "validate_judge_target", spy)
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert Path(recipe.data.prompts).exists(), "recipe data paths resolve relative to the recipe"
    assert recipe.judge.target in resolved
    if recipe.eval.judge is not None:
        assert recipe.eval.judge.target in resolved
    assert recipe_from_dict(recipe_to_dict(recipe)) == recipe


def test_recipes_exist():
    names = {p.relative_to(REPO / "recipes").as_posix() for p in RECIPES}
    assert {"quickstart.yaml", "offline_vs_online/fully_online.yaml"} <= names


def test_defaults_and_nesting():
    r = recipe_from_dict(minimal(train={"learning_rate": "1e-5"}))
    assert r.train.learning_rate == 1e-5 and r.generation.backend == "vllm"
    assert r.generation.samples_per_prompt == 4 and r.pairs.max_length_ratio is None
    assert (r.reference.swap_every_rounds, r.reference.ema_every_steps, r.reference.ema_rate) == (1, 1, 0.1)


def test_models_are_frozen_and_closed():
    r = recipe_from_dict(minimal())
    with pytest.raises(ValidationError):
        r.rounds = 3
    with pytest.raises(ValidationError):
        TrainConfig(lerning_rate=1.0)
    assert "Completions sampled per prompt" in GenerationConfig.model_fields["samples_per_prompt"].description


@pytest.mark.parametrize(
    "data, message",
    [
        (minimal(rounds="three"), "rounds: expected an integer, got 'three'"),
        (minimal(rounds=True), "rounds: expected an integer, got True"),
        (minimal(train={"epochs": 2.5}), "train.epochs: expected an integer, got 2.5"),
        (minimal(train={"learning_rate": True}), "train.learning_rate: expected a number, got True"),
        (minimal(train={"learning_rate": "fast"}), "train.learning_rate: expected a number"),
        (minimal(generation={"top_p": float("nan")}), "generation.top_p: expected a finite number"),
        (minimal(judge={"target": 3}), "judge.target: expected a string, got 3"),
        (minimal(trian={"epochs": 1}), "unknown key trian"),
        (minimal(train={"epoch": 1}), r"unknown key train.epoch \(known: carry_optimizer_state, epochs, grad_accum_steps"),
        (minimal(loss={"betta": 1}), r"unknown key loss.betta \(known: .*beta"),
        (minimal(train={"lora": {"rnak": 4}}), "unknown key train.lora.rnak"),
        (minimal(loss={"loss_type": "dpo"}), "loss.loss_type: 'dpo' is not one of"),
        (minimal(mode="semi_online"), "mode: 'semi_online' is not one of"),
        (minimal(train={"learning_rate": -1}), "train.learning_rate: must be > 0, got -1"),
        (minimal(train={"gradient_checkpointing": "yes"}), "train.gradient_checkpointing: expected true/false"),
        ({"name": "x", "rounds": 1, "data": {"prompts": "p"}}, "missing required key judge"),
        (minimal(judge={"kwargs": {}}), "missing required key judge.target"),
        (minimal(judge="judges.rules:X"), "judge: expected a mapping, got str"),
        (minimal(eval={"every": -1}), "eval.every: must be >= 0"),
    ],
)
def test_bad_recipes_name_the_key(data, message):
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(data)


@pytest.mark.parametrize(
    "data, message",
    [
        (minimal(generation={"n": 4}), "generation.n was renamed generation.samples_per_prompt"),
        (minimal(judge={"target": "judges.rules:ConciseAnswerJudge", "max_length_ratio": 2.0}),
         "judge.max_length_ratio was renamed pairs.max_length_ratio"),
        (minimal(eval={"judge": {"target": "judges.rules:ConciseAnswerJudge", "max_length_ratio": 2.0}}),
         "eval.judge.max_length_ratio was renamed pairs.max_length_ratio"),
        (minimal(reference={"every": 2}), r"reference.every was renamed reference.swap_every_rounds "
                                          r"\(schedule swap\) or reference.ema_every_steps \(schedule ema\)"),
        (minimal(reference={"schedule": "ema", "alpha": 0.5}), "reference.alpha was renamed reference.ema_rate"),
    ],
)
def test_renamed_keys_say_their_new_name(data, message):
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(data)


def test_renamed_key_in_an_override(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(minimal()))
    with pytest.raises(RecipeError, match="generation.n was renamed generation.samples_per_prompt"):
        load_recipe(path, ["generation.n=3"])
    r = load_recipe(path, ["generation.samples_per_prompt=3", "pairs.max_length_ratio=2",
                           "reference.schedule=ema", "reference.ema_every_steps=2", "reference.ema_rate=0.5"])
    assert (r.generation.samples_per_prompt, r.pairs.max_length_ratio) == (3, 2.0)
    assert (r.reference.ema_every_steps, r.reference.ema_rate) == (2, 0.5)


RANGES = [  # (section, key, a refused value, message)
    ("generation", "samples_per_prompt", 1, "must be >= 2"),
    ("generation", "temperature", 0, "must be > 0"),
    ("generation", "top_p", 0, "must be > 0"),
    ("generation", "top_p", 1.5, "must be <= 1"),
    ("generation", "max_tokens", 0, "must be > 0"),
    ("generation", "probe_tolerance", 0, "must be > 0"),
    ("generation", "kv_cache_gib", 0, "must be > 0"),
    ("generation", "gpu_memory_utilization", 0, "must be > 0"),
    ("generation", "gpu_memory_utilization", 1.2, "must be <= 1"),
    ("generation", "tensor_parallel_size", 0, "must be > 0"),
    ("judge", "max_failure_rate", 1.5, "must be <= 1"),
    ("judge", "max_failure_rate", -0.1, "must be >= 0"),
    ("judge", "retries", -1, "must be >= 0"),
    ("judge", "timeout_s", 0, "must be > 0"),
    ("judge", "backoff_s", 0, "must be > 0"),
    ("pairs", "replay_ratio", -0.5, "must be >= 0"),
    ("pairs", "max_length_ratio", 0, "must be > 0"),
    ("loss", "beta", 0, "must be > 0"),
    ("loss", "label_smoothing", 0.5, "must be < 0.5"),
    ("loss", "label_smoothing", -0.1, "must be >= 0"),
    ("loss", "nll_weight", -1, "must be >= 0"),
    ("loss", "desirable_weight", 0, "must be > 0"),
    ("loss", "undesirable_weight", 0, "must be > 0"),
    ("loss", "target_kl", 0, "must be > 0"),
    ("loss", "beta_adapt_rate", 0, "must be > 0"),
    ("loss", "beta_adapt_rate", 1.5, "must be <= 1"),
    ("train", "learning_rate", 0, "must be > 0"),
    ("train", "epochs", 0, "must be > 0"),
    ("train", "micro_batch_pairs", 0, "must be > 0"),
    ("train", "grad_accum_steps", 0, "must be > 0"),
    ("train", "max_grad_norm", 0, "must be > 0"),
    ("train", "weight_decay", -0.01, "must be >= 0"),
    ("reference", "swap_every_rounds", 0, "must be > 0"),
    ("reference", "ema_every_steps", 0, "must be > 0"),
    ("reference", "ema_rate", 0, "must be > 0"),
    ("reference", "ema_rate", 1.5, "must be <= 1"),
    ("data", "prompts_per_round", 0, "must be > 0"),
    ("data", "eval_prompts", 0, "must be >= 1"),
    ("eval", "samples_per_prompt", 0, "must be > 0"),
]


@pytest.mark.parametrize("section, key, value, message", RANGES, ids=lambda x: str(x))
def test_range_checks(section, key, value, message):
    data = minimal()
    node = data.setdefault(section, {})
    node[key] = value
    with pytest.raises(RecipeError, match=f"^{section}.{key}: {message}, got {value!r}$"):
        recipe_from_dict(data)


@pytest.mark.parametrize("key, value, message", [
    ("rank", 0, "must be > 0"), ("alpha", 0, "must be > 0"),
    ("dropout", 1.0, "must be < 1"), ("dropout", -0.1, "must be >= 0"),
])
def test_lora_range_checks(key, value, message):
    data = minimal(train={"lora": {key: value}}, reference={"schedule": "fixed"})
    with pytest.raises(RecipeError, match=f"train.lora.{key}: {message}"):
        recipe_from_dict(data)


def test_top_level_range_checks():
    with pytest.raises(RecipeError, match="^rounds: must be > 0, got 0$"):
        recipe_from_dict(minimal(rounds=0))
    with pytest.raises(RecipeError, match="^keep_checkpoints: must be >= 1, got 0$"):
        recipe_from_dict(minimal(keep_checkpoints=0))


def test_range_boundaries_that_are_allowed():
    r = recipe_from_dict(minimal(
        generation={"gpu_memory_utilization": 1, "top_p": 1},
        loss={"beta_adapt_rate": 1, "nll_weight": 0},
        train={"weight_decay": 0},
        reference={"schedule": "ema", "ema_rate": 1},
        data={"prompts": "p.jsonl", "eval_prompts": 1},
        judge={"target": "judges.rules:ConciseAnswerJudge", "max_failure_rate": 0, "retries": 0},
    ))
    assert r.generation.gpu_memory_utilization == 1.0 and r.reference.ema_rate == 1.0
    assert recipe_from_dict(minimal(train={"lora": {"dropout": 0}}, reference={"schedule": "fixed"})).train.lora.dropout == 0


# ---------------------------------------------------------------------------- compat.check_recipe


@pytest.mark.parametrize(
    "data, message",
    [
        (minimal(train={"lora": {"rank": 4}}), "train.lora: needs reference.schedule: fixed"),
        (minimal(eval={"every": 2}, loss={"target_kl": 2.0}), "eval.every: adaptive beta"),
        (minimal(loss={"loss_type": "kto"}, pairs={"replay_ratio": 0.5}), "pairs.replay_ratio: loss.loss_type kto"),
        (minimal(loss={"loss_type": "kto", "label_smoothing": 0.1}),
         "loss.label_smoothing: only loss.loss_type sigmoid and robust use it .* kto"),
        (minimal(loss={"loss_type": "kto"}, pairs={"strategy": "random"}),
         "pairs.strategy: random .* loss.loss_type kto labels every sample by its score"),
        (minimal(loss={"loss_type": "ipo", "label_smoothing": 0.1}), "loss.label_smoothing: .* ipo"),
        (minimal(loss={"loss_type": "hinge", "label_smoothing": 0.1}), "loss.label_smoothing: .* hinge"),
        (minimal(data={"prompts": "p.jsonl", "pairs": "pairs.jsonl"}),
         "data.pairs is read only by mode: offline .*mode: online"),
        (minimal(mode="fully_online", data={"prompts": "p.jsonl", "pairs": "pairs.jsonl"}),
         "data.pairs is read only by mode: offline .*mode: fully_online"),
        (minimal(mode="fully_online", data={"prompts": "p.jsonl"}, pairs={"replay_ratio": 0.5}),
         "pairs.replay_ratio: mode fully_online trains one optimizer step"),
        (minimal(mode="fully_online", data={"prompts": "p.jsonl"}, loss={"loss_type": "kto"}),
         "loss.loss_type: kto .* mode fully_online could not keep one optimizer step"),
        # A key of another reference schedule would be ignored in silence.
        (minimal(reference={"schedule": "ema", "swap_every_rounds": 2}),
         "reference.swap_every_rounds is read by reference.schedule swap only; .* schedule ema"),
        (minimal(reference={"schedule": "swap", "ema_rate": 0.5}), "reference.ema_rate is read by reference.schedule ema"),
        (minimal(reference={"schedule": "fixed", "ema_every_steps": 4}), "reference.ema_every_steps .* schedule fixed"),
        (minimal(generation={"max_tokens": 512, "max_model_len": 512}),
         "generation.max_tokens: 512 leaves no room for a prompt within generation.max_model_len 512"),
        (minimal(data={"prompts": "p.jsonl", "max_prompt_tokens": 2000}),
         "data.max_prompt_tokens: 2000 prompt tokens plus generation.max_tokens 64 exceed generation.max_model_len 2048"),
    ],
)
def test_combinations_are_refused_naming_the_keys(data, message):
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(data)


@pytest.mark.parametrize("data", [
    minimal(loss={"loss_type": "sigmoid", "label_smoothing": 0.1}),
    minimal(loss={"loss_type": "robust", "label_smoothing": 0.1}),
    minimal(loss={"loss_type": "kto", "length_normalize": True, "nll_weight": 0.5}),
    minimal(mode="offline", data={"prompts": "p.jsonl", "pairs": "pairs.jsonl"}),
    minimal(train={"lora": {"rank": 4}}, reference={"schedule": "fixed"}),
    minimal(loss={"target_kl": 2.0}),
    minimal(data={"prompts": "p.jsonl", "max_prompt_tokens": 1984}),
    minimal(reference={"schedule": "ema", "ema_rate": 0.5, "ema_every_steps": 4, "swap_every_rounds": 1}),
])
def test_combinations_that_are_fine(data):
    recipe_from_dict(data)


@pytest.mark.parametrize("judge, key, message", [
    ({"target": "no_such_module:Judge"}, "judge", "judge.target: 'no_such_module:Judge': cannot import module"),
    ({"target": "judges.rules:ConcisAnswerJudge"}, "judge", "judge.target: .*has no 'ConcisAnswerJudge'"),
    ({"target": "judges.rules:ConciseAnswerJudge", "kwargs": {"max_wrods": 3}}, "judge",
     "judge.kwargs do not fit judges.rules:ConciseAnswerJudge"),
    ({"target": "judges.protocol:Judgment"}, "judge", "judge.target: .*neither judge"),
    ({"target": "judges.rules:InformativAnswerJudge"}, "eval", "eval.judge.target: .*has no 'InformativAnswerJudge'"),
    ({"target": "judges.rules:ConciseAnswerJudge", "kwargs": {"x": 1}}, "eval",
     "eval.judge.kwargs do not fit"),
])
def test_a_bad_judge_fails_at_load(judge, key, message):
    data = minimal(judge=judge) if key == "judge" else minimal(eval={"judge": judge})
    with pytest.raises(RecipeError, match=f"^{message}"):
        recipe_from_dict(data)


def test_kto_without_a_dataset_needs_a_pointwise_judge():
    for mode in ("online", "offline"):  # offline without data.pairs: pi_0 samples (fully_online: no KTO)
        with pytest.raises(RecipeError, match="judge.target tests.test_config:PairwiseOnly is not a "
                                              "pointwise judge"):
            recipe_from_dict(minimal(mode=mode, loss={"loss_type": "kto"}, judge=PAIRWISE))
    recipe_from_dict(minimal(loss={"loss_type": "sigmoid"}, judge=PAIRWISE))  # pairs: any judge
    recipe_from_dict(minimal(loss={"loss_type": "kto"}))  # ConciseAnswerJudge scores
    # A labelled dataset needs no scores from the judge.
    recipe_from_dict(minimal(mode="offline", loss={"loss_type": "kto"}, judge=PAIRWISE,
                             data={"prompts": "p.jsonl", "pairs": "labelled.jsonl"}))


# ---------------------------------------------------------------------------- fully_online


def test_fully_online_derives_a_step_per_round():
    r = recipe_from_dict(minimal(mode="fully_online", train={"micro_batch_pairs": 3, "grad_accum_steps": 2}))
    assert (r.data.prompts_per_round, r.train.epochs) == (6, 1)
    r = recipe_from_dict(minimal(mode="fully_online"))
    assert r.data.prompts_per_round == 4  # the defaults: 4 pairs x 1 accumulation step
    online = recipe_from_dict(minimal(train={"micro_batch_pairs": 3, "grad_accum_steps": 2}))
    assert online.data.prompts_per_round == 16  # other modes keep their own


@pytest.mark.parametrize("data, message", [
    (minimal(mode="fully_online", data={"prompts": "p.jsonl", "prompts_per_round": 16}),
     r"^data.prompts_per_round: mode fully_online .* train.micro_batch_pairs \* train.grad_accum_steps "
     r"= 4; got 16"),
    (minimal(mode="fully_online", train={"epochs": 2}), "^train.epochs: mode fully_online .* got 2"),
])
def test_fully_online_refuses_other_values(data, message):
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(data)


def test_resolved_recipes_round_trip(tmp_path):
    """run.py writes recipe_to_dict as YAML to the run dir and re-reads it on resume."""
    for data in (minimal(mode="fully_online", train={"micro_batch_pairs": 2, "grad_accum_steps": 3}),
                 minimal(train={"lora": {"rank": 4}}, reference={"schedule": "fixed"},
                         eval={"judge": {"target": "judges.rules:InformativeAnswerJudge"}})):
        r = recipe_from_dict(data)
        again = recipe_from_dict(yaml.safe_load(yaml.safe_dump(recipe_to_dict(r), sort_keys=False)))
        assert again == r and recipe_to_dict(again) == recipe_to_dict(r)
    assert recipe_to_dict(r)["train"]["lora"]["rank"] == 4


# ---------------------------------------------------------------------------- overrides, files


def test_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: a\nrounds: 1\njudge: {target: judges.rules:ConciseAnswerJudge}\n"
                    "data: {prompts: p.jsonl}\n")
    r = load_recipe(path, ["rounds=3", "train.learning_rate=3e-6", "judge.kwargs.max_words=9"])
    assert r.rounds == 3 and r.train.learning_rate == 3e-6 and r.judge.kwargs == {"max_words": 9}
    r = load_recipe(path, ["train.lora.rank=4", "reference.schedule=fixed"])  # into a null section
    assert r.train.lora.rank == 4
    with pytest.raises(RecipeError, match="key=value"):
        load_recipe(path, ["rounds"])
    with pytest.raises(RecipeError, match="unknown key train.lr"):
        load_recipe(path, ["train.lr=1"])


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match="invalid YAML"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="recipe: expected a mapping, got list"):
        load_recipe(listed)
