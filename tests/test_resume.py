"""Kill a real run with SIGKILL between steps and inside training, resume it, and check that the
result equals an uninterrupted run and that finished work was not redone."""

import json
import signal

import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import cli, tiny_recipe_dict

COMPARED = ("loss", "accuracy", "reward_margin", "judge_score", "eval_judge_score",
            "kl_to_reference", "pairs_kept", "mean_length")


def run_cli(recipe_path, *overrides, kill_at=None):
    return cli("run", str(recipe_path), *overrides, kill_at=kill_at)


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_killed_run_resumes_to_the_same_result(tiny_model_dir, prompts_file, tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(tiny_model_dir, prompts_file, tmp_path / "runs")))

    straight = run_cli(recipe, "name=straight")
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed = run_cli(recipe, "name=killed", kill_at="round_1/judge")
    assert killed.returncode == -signal.SIGKILL
    round1 = tmp_path / "runs" / "killed" / "round_1"
    assert (round1 / "judge.json").exists() and not (round1 / "pairs.json").exists()
    sample_mtime = (round1 / "samples.jsonl").stat().st_mtime_ns

    killed = run_cli(recipe, "name=killed", kill_at="round_2/train_step_1")
    assert killed.returncode == -signal.SIGKILL
    round2 = tmp_path / "runs" / "killed" / "round_2"
    assert (round2 / "pairs.json").exists() and not (round2 / "train.json").exists()
    assert not (round2 / "checkpoint").exists()
    assert (round1 / "samples.jsonl").stat().st_mtime_ns == sample_mtime  # never redone

    resumed = run_cli(recipe, "name=killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming: policy from round_1/checkpoint" in resumed.stdout

    a, b = metrics(tmp_path / "runs" / "straight"), metrics(tmp_path / "runs" / "killed")
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        for key in COMPARED:
            assert ra[key] == rb[key], (ra["round"], key)
    wa = load_file(tmp_path / "runs" / "straight" / "round_2" / "checkpoint" / "model.safetensors")
    wb = load_file(round2 / "checkpoint" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resumed_run_never_pays_twice_for_a_judgment(tiny_model_dir, prompts_file, tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(tiny_model_dir, prompts_file, tmp_path / "runs",
                                                      rounds=1)))
    killed = run_cli(recipe, kill_at="round_1/judge_prompt_2")  # 2 of 4 prompts judged
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "runs" / "tiny" / "round_1" / "judgments.jsonl").exists()
    assert run_cli(recipe).returncode == 0
    judge = json.loads((tmp_path / "runs" / "tiny" / "round_1" / "judge.json").read_text())
    assert judge["judge_cache_hits"] == 2 * 3  # 2 prompts x 3 samples came from the cache
    assert judge["judge_calls"] == 2 * 3  # only the other 2 prompts were judged again


def test_cli_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nrounds: 2\njudge: {target: judges.rules:ConciseAnswerJudge}\n"
                   "data: {prompts: p.jsonl}\ntrain: {lerning_rate: 1}\n")
    out = run_cli(bad)
    assert out.returncode == 2 and "unknown key train.lerning_rate" in out.stderr
    missing_judge = tmp_path / "judge.yaml"
    missing_judge.write_text("name: x\nrounds: 2\njudge: {target: my_judges:Nope}\n"
                             "data: {prompts: p.jsonl}\n")
    out = run_cli(missing_judge)
    assert out.returncode == 2 and "cannot import module 'my_judges'" in out.stderr
