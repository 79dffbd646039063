"""The run-long learning-rate schedule (train.lr_scheduler, train.warmup_ratio) and Adam's state
carried across rounds (train.carry_optimizer_state): the rates transformers' schedulers give,
recorded per step, and a killed run that resumes to bit-identical weights."""

import json
import signal

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import get_scheduler

from online_dpo.training.lr_schedule import UNITS_PER_ROUND, RunSchedule
from tests.conftest import tiny_recipe_dict
from tests.test_resume import run_cli


def test_rates_follow_transformers_schedulers_over_the_whole_run():
    assert {RunSchedule("constant", 0.0, 3, 1e-3).rate(k, t, 4) for k in (1, 2, 3) for t in range(4)} == {1e-3}
    cosine = RunSchedule("cosine", 0.1, 3, 1e-3)
    rates = [cosine.rate(k, t, 4) for k in (1, 2, 3) for t in range(4)]
    peak = rates.index(max(rates))
    assert 0 < rates[0] < rates[peak] and peak <= 2  # warm-up over the first tenth of the run
    assert all(a >= b for a, b in zip(rates[peak:], rates[peak + 1:]))  # then decays, to ~0
    assert rates[-1] < 0.01 * max(rates)
    # The library's own schedule, read at the step's centre of the run.
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    library = get_scheduler("cosine", probe, num_warmup_steps=3 * UNITS_PER_ROUND // 10,
                            num_training_steps=3 * UNITS_PER_ROUND).lr_lambdas[0]
    assert cosine.rate(2, 1, 4) == pytest.approx(1e-3 * library(1.375 * UNITS_PER_ROUND))
    linear = RunSchedule("linear", 0.0, 2, 1e-3)
    # A round that kept fewer pairs (2 steps, not 4) still spans its share of the run.
    assert linear.rate(1, 0, 4) > linear.rate(1, 1, 2) > linear.rate(2, 0, 4)


SCHEDULED = {"train.lr_scheduler": "cosine", "train.warmup_ratio": 0.25, "train.carry_optimizer_state": True,
             "reference.schedule": "fixed"}


def test_a_scheduled_run_with_carried_adam_resumes_bit_identically(tiny_model_dir, prompts_file, tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(tiny_model_dir, prompts_file, tmp_path / "runs", **SCHEDULED)))
    runs = tmp_path / "runs"
    straight = run_cli(recipe, "name=straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = run_cli(recipe, "name=killed", kill_at="round_2/train_step_1")
    assert killed.returncode == -signal.SIGKILL
    assert (runs / "killed" / "round_1" / "checkpoint" / "optimizer.pt").exists()
    resumed = run_cli(recipe, "name=killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    fresh = run_cli(recipe, "name=fresh_adam", "train.carry_optimizer_state=false")
    assert fresh.returncode == 0, fresh.stderr[-3000:]

    def train(name, k):
        return json.loads((runs / name / f"round_{k}" / "train.json").read_text())

    def weights(name):
        return load_file(runs / name / "round_2" / "checkpoint" / "model.safetensors")

    rates = train("straight", 1)["learning_rates"] + train("straight", 2)["learning_rates"]
    assert len(rates) >= 3 and len(set(rates)) >= 3  # not constant
    assert rates.index(max(rates)) < len(rates) - 1 and rates[-1] < max(rates)  # warm-up, then decay
    assert train("killed", 2)["learning_rates"] == train("straight", 2)["learning_rates"]
    a, b = weights("straight"), weights("killed")
    assert all(torch.equal(a[k], b[k]) for k in a)  # Adam's moments came back from optimizer.pt
    c = weights("fresh_adam")
    assert any(not torch.equal(a[k], c[k]) for k in a)  # and carrying them changed the result
    metrics = [json.loads(x) for x in (runs / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[1]["learning_rate"] == rates[-1]


def test_a_schedule_over_the_run_refuses_more_rounds_on_resume(tiny_model_dir, prompts_file, tmp_path):
    recipe = tmp_path / "tiny.yaml"
    body = tiny_recipe_dict(tiny_model_dir, prompts_file, tmp_path / "runs", rounds=1, **SCHEDULED)
    recipe.write_text(yaml.safe_dump(body))
    assert run_cli(recipe).returncode == 0
    more = run_cli(recipe, "rounds=2")
    assert more.returncode == 2 and "more rounds would change the learning rate" in more.stderr
