"""Asynchronous online DPO (generation.max_staleness) on the tiny model, in turn (the transformers
backend draws ahead inline): the schedule of sampling policies, its record, the reference check,
a kill and resume, and the refusal of samples older than the bound. The overlap with a real
`vllm serve` is tested in tests/test_server_sampling.py; the draw orchestration's threading here."""

import json
import random
import signal
import threading
import time

import pytest
import yaml

from online_dpo.config.recipe import RecipeError, recipe_from_dict
from online_dpo.pipeline.draw_ahead import Background, Inline, StaleSchedule
from online_dpo.pipeline.run import Run
from online_dpo.sampling.samplers import StaleSampleError, policy_version, run_label
from tests.conftest import tiny_recipe_dict
from tests.test_resume import metrics, run_cli


def stale_recipe(tiny_model_dir, prompts_file, tmp_path, staleness, **overrides) -> dict:
    return tiny_recipe_dict(tiny_model_dir, prompts_file, tmp_path / "runs", rounds=3,
                            **{"generation.max_staleness": staleness, **overrides})


def round_json(run: Run, k: int, name: str) -> dict:
    return json.loads((run.dir / f"round_{k}" / f"{name}.json").read_text())


def sample_versions(run: Run, k: int) -> set[str]:
    lines = (run.dir / f"round_{k}" / "samples.jsonl").read_text().splitlines()
    return {s["weight_version"] for line in lines for s in json.loads(line)["samples"]}


def sampled_tokens(run: Run, k: int) -> list[list[list[int]]]:
    lines = (run.dir / f"round_{k}" / "samples.jsonl").read_text().splitlines()
    return [[s["token_ids"] for s in json.loads(line)["samples"]] for line in lines]


def test_the_schedule_of_sampling_policies():
    assert [StaleSchedule(0, 4).sampler_round(k) for k in range(1, 5)] == [0, 1, 2, 3]
    assert [StaleSchedule(1, 4).sampler_round(k) for k in range(1, 5)] == [0, 0, 1, 2]
    assert [StaleSchedule(2, 4).sampler_round(k) for k in range(1, 5)] == [0, 0, 0, 1]
    assert StaleSchedule(0, 4).drawn_by(0) == []  # synchronous: each round samples in its turn
    assert StaleSchedule(1, 4).drawn_by(0) == [1, 2] and StaleSchedule(1, 4).drawn_by(1) == [3]
    assert StaleSchedule(1, 4).drawn_by(3) == []  # round 5 does not exist


def test_staleness_1_samples_round_k_with_the_policy_of_round_k_minus_2(tiny_model_dir, prompts_file, tmp_path):
    sync = Run(recipe_from_dict(stale_recipe(tiny_model_dir, prompts_file, tmp_path, 0, name="sync")))
    stale = Run(recipe_from_dict(stale_recipe(tiny_model_dir, prompts_file, tmp_path, 1, name="stale")))
    sync_rows, stale_rows = sync.execute(), stale.execute()
    label = run_label("stale", stale.dir)
    assert [sample_versions(stale, k) for k in (1, 2, 3)] == \
           [{policy_version(label, 0)}, {policy_version(label, 0)}, {policy_version(label, 1)}]
    assert [round_json(stale, k, "sample")["staleness"] for k in (1, 2, 3)] == [0, 1, 1]
    assert [r["staleness"] for r in stale_rows] == [0, 1, 1] and [r["staleness"] for r in sync_rows] == [0, 0, 0]
    # The reference (swapped to the policy every round) is the sampler only in round 1: pi_0 both.
    # Rounds 2 and 3 were sampled by an older policy than the reference, so they take a forward.
    assert [r["reference_logps_from"] for r in stale_rows] == ["sampler", "forward", "forward"]
    assert [r["reference_logps_from"] for r in sync_rows] == ["sampler"] * 3
    # Round 1 is pi_0's in both runs, with the same seeds: the same samples, pairs and loss. From
    # round 2 on the synchronous run samples its own, newer policy.
    assert sampled_tokens(sync, 1) == sampled_tokens(stale, 1) and sampled_tokens(sync, 2) != sampled_tokens(stale, 2)
    assert sync_rows[0]["loss"] == stale_rows[0]["loss"]
    assert sample_versions(sync, 2) == {policy_version(run_label("sync", sync.dir), 1)}


def test_a_fixed_pi0_reference_reuses_the_samplers_log_probs_under_staleness(tiny_model_dir, prompts_file, tmp_path):
    """Staleness 2 over 3 rounds: pi_0 samples every round, and pi_0 is the reference."""
    run = Run(recipe_from_dict(stale_recipe(tiny_model_dir, prompts_file, tmp_path, 2, name="fixed",
                                            reference={"schedule": "fixed"})))
    rows = run.execute()
    assert [r["reference_logps_from"] for r in rows] == ["sampler"] * 3
    assert [r["staleness"] for r in rows] == [0, 1, 2]


COMPARED = ("loss", "accuracy", "judge_score", "eval_judge_score", "kl_to_pi0", "staleness", "pairs_kept")


@pytest.mark.parametrize("kill_at", ["round_3/sample", "round_2/train_step_1"])
def test_a_stale_run_killed_and_resumed_gives_the_same_metrics(tiny_model_dir, prompts_file, tmp_path, kill_at):
    """Round 3 is drawn (by policy 1) after round 1's eval, before round 2 trains; a kill there or in
    round 2's training leaves the schedule as it was."""
    recipe = tmp_path / "stale.yaml"
    recipe.write_text(yaml.safe_dump(stale_recipe(tiny_model_dir, prompts_file, tmp_path, 1)))
    straight = run_cli(recipe, "name=straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = run_cli(recipe, "name=killed", kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (tmp_path / "runs" / "killed" / "round_2" / "train.json").exists()
    resumed = run_cli(recipe, "name=killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "the stale schedule, drawn in turn with training" in resumed.stdout
    a, b = metrics(tmp_path / "runs" / "straight"), metrics(tmp_path / "runs" / "killed")
    assert [r["round"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b, strict=True):
        for key in COMPARED:
            assert ra[key] == rb[key], (ra["round"], key)


def test_samples_older_than_the_bound_are_refused_before_training(tiny_model_dir, prompts_file, tmp_path):
    recipe = tmp_path / "stale.yaml"
    data = stale_recipe(tiny_model_dir, prompts_file, tmp_path, 1, name="old")
    recipe.write_text(yaml.safe_dump(data))
    killed = run_cli(recipe, kill_at="round_3/judge")  # round 3 drawn and judged by policy 1
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    round3 = tmp_path / "runs" / "old" / "round_3"
    stats = json.loads((round3 / "sample.json").read_text())
    assert stats["policy_round"] == 1
    (round3 / "sample.json").write_text(json.dumps({**stats, "policy_round": 0}))  # as if pi_0 drew them
    run = Run(recipe_from_dict(data))
    with pytest.raises(StaleSampleError, match="round 3: its samples were drawn by the policy of round 0, "
                                               "2 updates before .* generation.max_staleness is 1"):
        run.execute()
    assert not (round3 / "pairs.json").exists() and not (round3 / "train.json").exists()
    assert (tmp_path / "runs" / "old" / "round_2" / "train.json").exists()  # finished work is kept


def flat_or_length(row, completion: str) -> float:
    """A test judge: every answer to a row marked `flat` scores the same (no pair), others by length."""
    return 0.0 if row["flat"] else float(len(completion.split()))


def flat_round_recipe(tiny_model_dir, prompts_file, tmp_path, flat_round: int, rounds: int) -> dict:
    """Staleness 1 over `rounds` rounds, where round `flat_round` keeps no pair: its prompts (the
    run's seeded order, 4 a round over the 10 training rows; the last 2 are held out) are marked flat."""
    rows = [json.loads(line) for line in prompts_file.read_text().splitlines()]
    order = list(range(len(rows) - 2))
    random.Random(0).shuffle(order)
    flat = {order[(4 * (flat_round - 1) + i) % len(order)] for i in range(4)}
    prompts = tmp_path / "flat.jsonl"
    prompts.write_text("".join(json.dumps({**row, "flat": i in flat}) + "\n" for i, row in enumerate(rows)))
    return tiny_recipe_dict(tiny_model_dir, prompts, tmp_path / "runs", rounds=rounds,
                            **{"generation.max_staleness": 1,
                               "judge": {"target": "judges.functions:PointwiseFunction",
                                         "kwargs": {"function": "tests.test_staleness:flat_or_length"}}})


def test_a_round_without_pairs_leaves_the_policy_that_samples_ahead(tiny_model_dir, prompts_file, tmp_path):
    """Round 2 trains nothing, so the policy of round 2 is round 1's: it samples round 4 (as round
    3). Killed after round 4 was drawn, before round 3 trains, the run resumes and draws nothing
    again. More rounds are refused: their sampling policies are gone from the sampler."""
    recipe = tmp_path / "flat.yaml"
    data = flat_round_recipe(tiny_model_dir, prompts_file, tmp_path, flat_round=2, rounds=4)
    recipe.write_text(yaml.safe_dump(data))
    straight = run_cli(recipe, "name=straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = run_cli(recipe, "name=killed", kill_at="round_4/sample")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (tmp_path / "runs" / "killed" / "round_3" / "train.json").exists()
    resumed = run_cli(recipe, "name=killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name in ("straight", "killed"):
        run_dir = tmp_path / "runs" / name
        rows = metrics(run_dir)
        assert [r["train_pairs"] for r in rows][1] == 0 and all(r["train_pairs"] for r in rows[::2])
        label = run_label(name, run_dir)
        versions = [{s["weight_version"] for line in (run_dir / f"round_{k}" / "samples.jsonl").read_text().splitlines()
                     for s in json.loads(line)["samples"]} for k in (1, 2, 3, 4)]
        assert versions == [{policy_version(label, v)} for v in (0, 0, 1, 1)], name
        # Updates between the sampling policy and the trained one: round 2 was not an update.
        assert [r["staleness"] for r in rows] == [0, 1, 0, 1], name
    a, b = metrics(tmp_path / "runs" / "straight"), metrics(tmp_path / "runs" / "killed")
    for ra, rb in zip(a, b, strict=True):
        for key in COMPARED:
            assert ra[key] == rb[key], (ra["round"], key)
    with pytest.raises(RecipeError, match="more rounds under generation.max_staleness 1"):
        Run(recipe_from_dict({**data, "name": "straight", "rounds": 5})).execute()


def test_offline_mode_refuses_a_staleness(tiny_model_dir, prompts_file, tmp_path):
    with pytest.raises(RecipeError, match="generation.max_staleness: offline mode samples nothing per round"):
        recipe_from_dict(stale_recipe(tiny_model_dir, prompts_file, tmp_path, 1, mode="offline"))


# ---------------------------------------------------------------------------- the draw threads


def test_background_draws_run_beside_the_caller_and_wait_for_one_round():
    started, release, done = threading.Event(), threading.Event(), []

    def draw(k):
        started.set()
        if k == 2:
            release.wait(10)
        done.append(k)

    draws = Background()
    draws.start([1, 2], draw)
    assert started.wait(5)
    draws.wait(1)  # round 1's draw is done; round 2's is held
    assert done == [1]
    release.set()
    draws.settle()
    assert done == [1, 2]


def test_a_failed_background_draw_is_raised_at_its_rounds_turn_and_never_hangs():
    def draw(k):
        if k == 3:
            raise RuntimeError("the vLLM server at http://127.0.0.1:1 did not answer")

    draws = Background()
    draws.start([3, 4], draw)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="did not answer"):
        draws.wait(4)  # round 4 never comes: the failure of round 3 ends the wait
    assert time.monotonic() - t0 < 5
    draws.settle()  # raised once, and the run may stop cleanly


def test_a_closed_background_starts_no_further_round():
    """The run stopped (a failure in its own thread, or the end): the round in flight may end, and
    no draw writes into the run after it."""
    started, release, done = threading.Event(), threading.Event(), []

    def draw(k):
        started.set()
        release.wait(10)
        done.append(k)

    draws = Background()
    draws.start([3, 4], draw)
    assert started.wait(5)
    threading.Timer(0.2, release.set).start()
    draws.close()
    time.sleep(0.2)
    assert done == [3]


def test_inline_draws_run_at_once():
    done = []
    Inline().start([2, 3], done.append)
    assert done == [2, 3]
