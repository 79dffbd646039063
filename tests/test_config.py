from pathlib import Path

import pytest

from online_dpo.config import Recipe, RecipeError, load_recipe, recipe_from_dict

REPO = Path(__file__).resolve().parents[1]
# recipes/accelerate/ holds `accelerate launch` configs, not recipes (tested in test_distributed).
RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if "accelerate" not in p.parts)


def minimal(**extra):
    data = {"name": "x", "rounds": 2, "judge": {"target": "judges.rules:ConciseAnswerJudge"},
            "data": {"prompts": "p.jsonl"}}
    data.update(extra)
    return data


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_recipe_loads(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert Path(recipe.data.prompts).exists(), "recipe data paths resolve relative to the recipe"


def test_recipes_exist():
    assert any(p.name == "quickstart.yaml" for p in RECIPES)


def test_defaults_and_nesting():
    r = recipe_from_dict(minimal(train={"learning_rate": "1e-5"}))
    assert r.train.learning_rate == 1e-5 and r.generation.backend == "vllm"


@pytest.mark.parametrize(
    "data, message",
    [
        (minimal(rounds="three"), "rounds: expected an integer"),
        (minimal(trian={"epochs": 1}), "unknown key trian"),
        (minimal(train={"epoch": 1}), "unknown key train.epoch"),
        (minimal(loss={"loss_type": "dpo"}), "loss.loss_type: 'dpo' is not one of"),
        (minimal(generation={"n": 1}), "generation.n"),
        (minimal(train={"learning_rate": -1}), "train.learning_rate: must be > 0"),
        (minimal(train={"gradient_checkpointing": "yes"}), "train.gradient_checkpointing: expected true/false"),
        ({"name": "x", "rounds": 1, "data": {"prompts": "p"}}, "missing required key judge"),
        (minimal(judge={"kwargs": {}}), "missing required key judge.target"),
        (minimal(judge="judges.rules:X"), "judge: expected a mapping"),
        (minimal(eval={"every": -1}), "eval.every: must be >= 0"),
        (minimal(eval={"every": 2}, loss={"target_kl": 2.0}), "eval.every: adaptive beta"),
    ],
)
def test_bad_recipes_name_the_key(data, message):
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(data)


def test_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: a\nrounds: 1\njudge: {target: judges.rules:ConciseAnswerJudge}\n"
                    "data: {prompts: p.jsonl}\n")
    r = load_recipe(path, ["rounds=3", "train.learning_rate=3e-6", "judge.kwargs.max_words=9"])
    assert r.rounds == 3 and r.train.learning_rate == 3e-6 and r.judge.kwargs == {"max_words": 9}
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
