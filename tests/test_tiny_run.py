"""A whole run on a tiny random model with the transformers backend: real files, real training."""

import json

import datasets
import pytest
import torch
import yaml
from safetensors.torch import load_file

from online_dpo.config.recipe import recipe_from_dict
from online_dpo.data.prompts import DatasetError
from online_dpo.pipeline.run import STEPS, Run
from online_dpo.sampling.weight_sync import WeightSyncError, verify_engine
from tests.conftest import REPO, cli, tiny_recipe_dict


@pytest.fixture
def finished_run(tiny_model_dir, prompts_file, tmp_path):
    recipe = recipe_from_dict(tiny_recipe_dict(tiny_model_dir, prompts_file, tmp_path / "runs"))
    run = Run(recipe)
    rows = run.execute()
    return run, rows


def test_round_artifacts_and_metrics(finished_run):
    run, rows = finished_run
    assert [r["round"] for r in rows] == [1, 2]
    assert (run.dir / "recipe.yaml").exists() and (run.dir / "plot.png").stat().st_size > 1000
    for k in (1, 2):
        d = run.dir / f"round_{k}"
        for step in STEPS:
            assert (d / f"{step}.json").exists(), step
        assert (d / "samples.jsonl").exists() and (d / "judgments.jsonl").exists()
        pairs = datasets.load_from_disk(str(d / "pairs"))
        assert {"prompt", "chosen", "rejected"} <= set(pairs.column_names)
        assert len(pairs) == rows[k - 1]["pairs_kept"]
    lines = [json.loads(x) for x in (run.dir / "metrics.jsonl").read_text().splitlines()]
    assert lines == rows
    for key in ("loss", "accuracy", "reward_margin", "chosen_reward", "rejected_reward",
                "kl_to_reference", "judge_score", "mean_length", "eos_rate", "pairs_kept",
                "pairs_dropped", "phase_seconds", "generation_seconds", "tokens_per_second"):
        assert key in rows[0], key
    assert rows[0]["pairs_kept"] + rows[0]["pairs_dropped"] == 4


def test_training_changed_weights_and_reference_follows_policy(finished_run, tiny_model_dir):
    run, rows = finished_run
    base = load_file(tiny_model_dir / "model.safetensors")
    trained = load_file(run.dir / "round_2" / "checkpoint" / "model.safetensors")
    assert any(not torch.equal(base[k], trained[k]) for k in base)
    # Swap schedule, every round: after round 2 the reference *is* the round-2 policy.
    assert json.loads((run.dir / "round_2" / "reference.json").read_text())["source_round"] == 2
    policy = run.models.accelerator.unwrap_model(run.trainer.policy)
    schedule = run.steps.reference
    assert schedule.source_round == 2
    with schedule.scoring(run.trainer.policy, policy_round=2) as reference:
        assert reference is policy  # no copy: before round 3 trains, the policy scores as the reference
    with schedule.at_eval() as reference:  # round 2's checkpoint, loaded for the step
        for (name, p), r in zip(policy.state_dict().items(), reference.state_dict().values()):
            assert torch.equal(p, r), name
    # Round 2 sampled from the round-1 policy, which was also its reference: vLLM-free reuse.
    assert rows[1]["reference_logps_from"] == "sampler"


def test_fixed_reference_stays_pi0(tiny_model_dir, prompts_file, tmp_path):
    data = tiny_recipe_dict(tiny_model_dir, prompts_file, tmp_path / "runs",
                            **{"reference.schedule": "fixed", "loss.length_normalize": True,
                               "loss.nll_weight": 0.1})
    run = Run(recipe_from_dict(data))
    rows = run.execute()
    assert [r["reference_source_round"] for r in rows] == [0, 0]
    assert rows[1]["reference_logps_from"] == "forward"
    base = load_file(tiny_model_dir / "model.safetensors")
    with run.steps.reference.at_eval() as model:
        reference = model.state_dict()
    for name, tensor in base.items():  # lm_head is tied to the embedding, so not saved twice
        assert torch.equal(tensor, reference[name]), name


def test_stale_sampler_is_detected(finished_run):
    run, _ = finished_run
    # The run closed its generator; a fresh one holds the base weights while the trainer holds
    # the round-2 policy. The probe must refuse it.
    from online_dpo.sampling.weight_sync import build_generator

    gen = build_generator(run.recipe, run.models.model_dir, run.models.eos_ids, run.models.pad_id)
    with pytest.raises(WeightSyncError, match="stale"):
        verify_engine(run.models, gen, tolerance=1e-3)
    gen.load_weights(run.models.unwrapped_policy_state().items())
    assert verify_engine(run.models, gen, tolerance=1e-3) < 1e-3


def test_rerun_of_finished_run_redoes_nothing(finished_run):
    run, rows = finished_run
    mtimes = {p: p.stat().st_mtime_ns for p in run.dir.rglob("*.json*")
              if p.name not in ("metrics.jsonl",)}
    again = Run(run.recipe).execute()
    assert again == rows
    assert mtimes == {p: p.stat().st_mtime_ns for p in mtimes}


def test_changed_recipe_refuses_to_mix(finished_run):
    from online_dpo.config.recipe import RecipeError

    run, _ = finished_run
    changed = run.recipe.model_copy(update={"loss": run.recipe.loss.model_copy(update={"beta": 0.5})})
    with pytest.raises(RecipeError, match="loss.beta"):
        Run(changed).execute()


class AlwaysCrashes:
    def score(self, row, completion):
        raise RuntimeError("judge backend exploded")


def test_crashing_judge_stops_past_the_failure_ceiling(tiny_model_dir, prompts_file, tmp_path):
    from online_dpo.pipeline.run import JudgeFailureError

    data = tiny_recipe_dict(tiny_model_dir, prompts_file, tmp_path / "runs",
                            judge={"target": "tests.test_tiny_run:AlwaysCrashes", "retries": 0,
                                   "max_failure_rate": 0.5})
    run = Run(recipe_from_dict(data))
    with pytest.raises(JudgeFailureError, match="judge failed on 4/4 prompts"):
        run.execute()
    judgments = (run.dir / "round_1" / "judgments.jsonl").read_text()
    assert "judge backend exploded" in judgments
    assert not (run.dir / "round_1" / "judge.json").exists()  # the step is not marked done
    # From the command line: the message and where to look, no traceback (unless asked for).
    recipe = tmp_path / "crash.yaml"
    recipe.write_text(yaml.safe_dump(data))
    for debug, traceback in (("0", False), ("1", True)):
        done = cli("run", str(recipe), env={"PYTHONPATH": str(REPO), "ONLINE_DPO_DEBUG": debug})
        assert done.returncode == 1 and "judge failed on 4/4 prompts" in done.stderr
        assert ("Traceback" in done.stderr) == traceback, done.stderr[-2000:]


def test_run_survives_a_round_without_pairs(tiny_model_dir, prompts_file, tmp_path):
    data = tiny_recipe_dict(tiny_model_dir, prompts_file, tmp_path / "runs",
                            judge={"target": "tests.test_tiny_run:AlwaysCrashes", "retries": 0,
                                   "max_failure_rate": 1.0})
    run = Run(recipe_from_dict(data))
    rows = run.execute()
    assert [r["pairs_failed"] for r in rows] == [4, 4]
    assert [r["train_pairs"] for r in rows] == [0, 0]
    assert not (run.dir / "round_1" / "checkpoint").exists()


@pytest.mark.parametrize("every, evaluated", [(2, [2, 3]), (0, [3])])
def test_eval_every_n_rounds_and_always_the_last(tiny_model_dir, prompts_file, tmp_path, every, evaluated):
    data = tiny_recipe_dict(tiny_model_dir, prompts_file, tmp_path / "runs", rounds=3, **{"eval.every": every})
    run = Run(recipe_from_dict(data))
    rows = run.execute()
    for row in rows:
        k = row["round"]
        summary = json.loads((run.dir / f"round_{k}" / "eval.json").read_text())
        assert (k in evaluated) == ("skipped" not in summary), k
        assert (row.get("kl_to_pi0") is not None) == (k in evaluated)
        assert (row.get("win_rate_vs_pi0") is not None) == (k in evaluated)
        assert (run.dir / f"round_{k}" / "eval_samples.jsonl").exists() == (k in evaluated)
        assert row["judge_score"] is not None  # fresh samples are judged every round regardless
    assert "| - |" in (run.dir / "metrics.md").read_text()
    assert (run.dir / "plot.png").stat().st_size > 1000


def test_a_prompt_longer_than_the_sampler_holds_is_dropped_not_sampled(tiny_model_dir, prompts_file, tmp_path):
    long_prompt = "Tell me everything about " + "very " * 150 + "long things."
    # First in the file: unfiltered, it would be a training prompt (the held-out ones are last).
    prompts_file.write_text(json.dumps({"prompt": long_prompt}) + "\n" + prompts_file.read_text())
    data = tiny_recipe_dict(tiny_model_dir, prompts_file, tmp_path / "runs", rounds=1,
                            **{"generation.max_model_len": 160, "data.prompts_per_round": 13})
    data["data"]["eval_prompts"] = 1
    with pytest.raises(DatasetError, match="1 of 13 prompts are longer than 148 tokens"):
        Run(recipe_from_dict({**data, "data": {**data["data"], "max_dropped_share": 0.05}})).execute()
    run = Run(recipe_from_dict(data))
    run.execute()
    assert json.loads((run.dir / "prompts.json").read_text()) == {
        "prompts": 12, "duplicate_prompts": 0, "dropped_long_prompts": 1, "train_prompts": 11, "eval_prompts": 1,
        "max_prompt_tokens": 148}
    sampled = [json.loads(x)["row"]["prompt"] for x in (run.dir / "round_1" / "samples.jsonl").read_text().splitlines()]
    assert len(sampled) == 13 and long_prompt not in sampled  # 11 training prompts, cycled


@pytest.mark.parametrize("schedule, train_loads", [
    ("swap", [[], []]),  # the reference is the policy as the round starts: scored by the policy itself
    ("fixed", [["pi0"], ["pi0"]]),  # pi_0, loaded for the scoring and freed
])
def test_frozen_models_are_loaded_only_for_the_steps_that_score_with_them(
        tiny_model_dir, prompts_file, tmp_path, monkeypatch, schedule, train_loads):
    from online_dpo.pipeline.steps import RoundSteps
    from online_dpo.training.models import Models

    phase, loads = ["build"], []
    original_load = Models.load

    def recording_load(self, folder, *args, **kwargs):
        name = "pi0" if folder == self.model_dir else folder.relative_to(self.recipe.run_dir).as_posix()
        loads.append((phase[0], name))
        return original_load(self, folder, *args, **kwargs)

    def in_phase(method):
        original = getattr(RoundSteps, method)

        def wrapped(self, k, *args):
            phase[0] = f"{method}_{k}"
            return original(self, k, *args)
        monkeypatch.setattr(RoundSteps, method, wrapped)

    monkeypatch.setattr(Models, "load", recording_load)
    for method in ("train", "evaluate", "update_reference"):
        in_phase(method)
    data = tiny_recipe_dict(tiny_model_dir, prompts_file, tmp_path / "runs", **{"reference.schedule": schedule})
    if schedule == "fixed":
        data["reference"] = {"schedule": "fixed", "cache_logps": False}
    Run(recipe_from_dict(data)).execute()
    assert [name for p, name in loads if p == "build"] == ["pi0"]  # the policy itself
    assert [[name for p, name in loads if p == f"train_{k}"] for k in (1, 2)] == train_loads
    assert not [1 for p, _ in loads if p.startswith("update_reference")]  # a swap moves no weights
    evaluated = [[name for p, name in loads if p == f"evaluate_{k}"] for k in (1, 2)]
    # KL to the round's reference (and to pi_0 once the reference has moved): loaded and freed.
    assert evaluated == ([["pi0"], ["round_1/checkpoint", "pi0"]] if schedule == "swap" else [["pi0"], ["pi0"]])
