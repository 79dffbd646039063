"""Hub IDs wherever a model is named, resolved from an HF cache laid out on disk by the test (the
hub's own layout: models--org--name/refs/<revision> -> snapshots/<commit>/), with no network."""

import json
import shutil

import pytest
import yaml

from online_dpo.storage.model_files import resolve_model_path
from tests.conftest import cli, tiny_recipe_dict

REPO_ID = "tiny-org/tiny-llama"
MAIN, V1 = "a" * 40, "b" * 40


@pytest.fixture
def hub_cache(tiny_model_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    root = tmp_path / "hub"
    repo = root / "models--tiny-org--tiny-llama"
    for commit in (MAIN, V1):
        shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v1").write_text(V1)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return root


def test_a_hub_id_resolves_to_its_cached_snapshot(hub_cache):
    snapshots = hub_cache / "models--tiny-org--tiny-llama" / "snapshots"
    assert resolve_model_path(REPO_ID) == snapshots / MAIN
    assert resolve_model_path(REPO_ID, revision="v1") == snapshots / V1
    assert resolve_model_path(REPO_ID, revision=V1) == snapshots / V1


def test_an_uncached_id_names_itself_and_the_cache(hub_cache):
    with pytest.raises(FileNotFoundError) as error:
        resolve_model_path("someone/absent-model")
    assert "someone/absent-model" in str(error.value) and str(hub_cache) in str(error.value)
    with pytest.raises(FileNotFoundError, match="revision v9"):
        resolve_model_path(REPO_ID, revision="v9")
    with pytest.raises(FileNotFoundError, match="nor a hub ID"):
        resolve_model_path("not/a/folder/or/id")


def test_a_reward_model_judge_takes_a_hub_id(hub_cache, tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from judges.reward_model import RewardModelJudge

    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    rm.config.pad_token_id = 2
    repo = hub_cache / "models--tiny-org--tiny-rm"
    rm.save_pretrained(repo / "snapshots" / MAIN)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, repo / "snapshots" / MAIN / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    judge = RewardModelJudge("tiny-org/tiny-rm", device="cpu")
    assert isinstance(judge.score({"prompt": "Hi?"}, "Hello."), float)
    with pytest.raises(FileNotFoundError, match="reward model: .*tiny-org/absent"):
        RewardModelJudge("tiny-org/absent", device="cpu")


def test_a_run_whose_policy_is_a_hub_id(hub_cache, prompts_file, tmp_path):
    recipe = tmp_path / "hub.yaml"
    body = tiny_recipe_dict(REPO_ID, prompts_file, tmp_path / "runs", rounds=1, **{"model.revision": "v1"})
    recipe.write_text(yaml.safe_dump(body))
    done = cli("run", str(recipe), env={"HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = [json.loads(x) for x in (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and metrics[0]["optimizer_steps"] >= 1
    resolved = yaml.safe_load((tmp_path / "runs" / "tiny" / "recipe.yaml").read_text())
    assert resolved["model"] == {**resolved["model"], "path": REPO_ID, "revision": "v1"}
