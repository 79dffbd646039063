"""Offline mode, reference schedules, adaptive beta, replay, fully online, eval: tiny real runs."""

import json

import datasets
import pytest
import torch

from online_dpo.config.recipe import recipe_from_dict
from online_dpo.pipeline.beta_schedules import next_beta
from online_dpo.pipeline.reference_schedules import soft_update
from online_dpo.pipeline.run import Run
from online_dpo.training.logprobs import score_sequences
from online_dpo.training.losses import kto_loss
from tests.conftest import cli, tiny_recipe_dict


def run(data):
    r = Run(recipe_from_dict(data))
    return r, r.execute()


def test_offline_from_a_conversational_dataset(tiny_model_dir, prompts_file, tmp_path):
    pairs = tmp_path / "prefs.jsonl"
    pairs.write_text("".join(json.dumps({
        "prompt": [{"role": "user", "content": f"Name a colour, {i}?"}],
        "chosen": [{"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "assistant", "content": "I would rather talk about something else entirely."}],
    }) + "\n" for i in range(6)))
    data = tiny_recipe_dict(tiny_model_dir, prompts_file, tmp_path / "runs", mode="offline",
                            **{"data.pairs": str(pairs), "reference.schedule": "fixed"})
    r, rows = run(data)
    assert [row["train_pairs"] for row in rows] == [4, 4]  # prompts_per_round pairs per round
    assert rows[0]["reference_logps_from"] == "forward"  # not sampled by this run's policies
    assert not (r.round_dir(1) / "samples.jsonl").exists()
    assert rows[1]["win_rate_vs_pi0"] is not None and rows[1]["kl_to_pi0"] is not None
    assert rows[1]["kl_to_pi0"] == rows[1]["kl_to_reference"]  # fixed reference *is* pi0


def test_offline_dataset_errors_name_column_and_row(tiny_model_dir, prompts_file, tmp_path):
    pairs = tmp_path / "prefs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Hi", "chosen": "a", "rejected": "b"}) + "\n"
                     + json.dumps({"prompt": "Hi", "chosen": "a", "rejected": []}) + "\n")
    data = tiny_recipe_dict(tiny_model_dir, prompts_file, tmp_path / "runs", mode="offline",
                            **{"data.pairs": str(pairs)})
    from online_dpo.data.prompts import DatasetError

    with pytest.raises(DatasetError, match="row 1: column 'rejected' is empty"):
        run(data)


def test_offline_pairs_sampled_once_from_pi0(tiny_model_dir, prompts_file, tmp_path):
    from online_dpo.config.recipe import RecipeError

    data = tiny_recipe_dict(tiny_model_dir, prompts_file, tmp_path / "runs", mode="offline")
    r, rows = run(data)
    # round_0/ drew the pool for 2 rounds: a third would silently reuse round 1's pairs.
    with pytest.raises(RecipeError, match="changed: rounds"):
        run({**data, "rounds": 3})
    collected = datasets.load_from_disk(str(r.round_dir(0) / "pairs"))
    assert set(collected["sampler_round"]) == {0}
    assert rows[0]["prompts"] == 8  # both rounds' prompts, sampled once up front
    assert rows[0]["reference_logps_from"] == "sampler"  # pi0 sampled them and is the reference
    assert rows[1]["reference_logps_from"] == "forward"  # round-1 policy is the reference now


def test_ema_reference_with_alpha_one_tracks_the_policy(tiny_model_dir, prompts_file, tmp_path):
    data = tiny_recipe_dict(tiny_model_dir, prompts_file, tmp_path / "runs", rounds=1,
                            reference={"schedule": "ema", "ema_every_steps": 1, "ema_rate": 1.0})
    r, rows = run(data)
    policy = r.models.accelerator.unwrap_model(r.trainer.policy)
    seq = [(r.models.prompt_ids("Tell me about snow."), [5, 6, 7, 2])]
    ref = score_sequences(r.steps.reference.model, seq, r.models.pad_id, r.models.device)
    pol = score_sequences(policy, seq, r.models.pad_id, r.models.device)
    assert torch.allclose(ref, pol)  # after the update, the reference's log-probs are the policy's
    assert (r.round_dir(1) / "reference_checkpoint" / "model.safetensors").exists()


def test_soft_update_blends():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    expected = 0.25 * b.weight.detach() + 0.75 * a.weight.detach()
    soft_update(a, b, 0.25)
    assert torch.allclose(a.weight, expected)


def test_adaptive_beta_direction():
    assert next_beta(0.1, kl=4.0, target_kl=2.0, rate=0.5) > 0.1  # too far from ref: tighten
    assert next_beta(0.1, kl=1.0, target_kl=2.0, rate=0.5) < 0.1  # too close: loosen
    assert next_beta(0.1, kl=2.0, target_kl=2.0, rate=0.5) == pytest.approx(0.1)
    assert next_beta(0.1, kl=float("nan"), target_kl=2.0, rate=0.5) == 0.1


def test_adaptive_beta_carries_between_rounds(tiny_model_dir, prompts_file, tmp_path):
    data = tiny_recipe_dict(tiny_model_dir, prompts_file, tmp_path / "runs",
                            loss={"beta": 0.1, "target_kl": 0.01})
    r, rows = run(data)
    assert rows[0]["beta"] == 0.1 and rows[1]["beta"] == pytest.approx(rows[0]["beta_next"])


def test_replay_and_checkpoint_pruning(tiny_model_dir, prompts_file, tmp_path):
    data = tiny_recipe_dict(tiny_model_dir, prompts_file, tmp_path / "runs", rounds=3,
                            keep_checkpoints=1, **{"pairs.replay_ratio": 0.5,
                                                   "reference.schedule": "fixed"})
    r, rows = run(data)
    assert rows[0]["replayed_pairs"] == 0 and rows[1]["replayed_pairs"] == 2
    assert rows[1]["train_pairs"] == rows[1]["fresh_pairs"] + 2
    assert [(r.round_dir(k) / "checkpoint").exists() for k in (1, 2, 3)] == [False, False, True]
    # Replay reads finished rounds' pairs without writing datasets cache files into them.
    assert not list(r.round_dir(1).glob("pairs/cache-*"))


def test_fully_online_one_step_per_round(tiny_model_dir, prompts_file, tmp_path):
    """Sample, judge and train every optimizer step, with a verified weight sync each step."""
    data = tiny_recipe_dict(tiny_model_dir, prompts_file, tmp_path / "runs", rounds=3, mode="fully_online",
                            **{"train.micro_batch_pairs": 2})
    del data["data"]["prompts_per_round"]  # derived: one optimizer step's pairs
    r, rows = run(data)
    assert r.recipe.data.prompts_per_round == 2 and r.recipe.train.epochs == 1
    assert [row["optimizer_steps"] for row in rows] == [1, 1, 1]
    assert all(row["prompts"] == 2 for row in rows)
    assert all(row["probe_max_abs_diff"] is not None for row in rows)


def test_kto_loss_hand_values():
    # logratio 1, z0 0, beta 1: desirable 1 - sigmoid(1) = 0.268941, undesirable 1 - sigmoid(-1)
    # = 0.731059; weights scale them.
    losses, rewards = kto_loss(torch.tensor([0.0, 0.0]), torch.tensor([-1.0, -1.0]),
                               torch.tensor([True, False]), beta=1.0, reference_point=torch.tensor(0.0),
                               undesirable_weight=2.0)
    assert losses.tolist() == pytest.approx([0.268941, 2 * 0.731059], abs=1e-6)
    assert rewards.tolist() == pytest.approx([1.0, 1.0]) and not rewards.requires_grad
    # A negative KL estimate is clamped to 0 (the reference point is never below zero).
    clamped, _ = kto_loss(torch.tensor([0.0]), torch.tensor([-1.0]), torch.tensor([True]),
                          beta=1.0, reference_point=torch.tensor(-5.0))
    assert clamped.item() == pytest.approx(0.268941, abs=1e-6)


def test_eval_and_compare_commands(tiny_model_dir, prompts_file, tmp_path):
    base = tiny_recipe_dict(tiny_model_dir, prompts_file, tmp_path / "runs")
    run({**base, "name": "online"})
    run({**base, "name": "offline", "mode": "offline"})
    out = cli("eval", str(tmp_path / "runs" / "online"), "--against", "pi0",
              "--against", str(tmp_path / "runs" / "offline"), "--samples", "1")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "runs" / "online" / "eval" / "round_2.json").read_text())
    assert set(result["against"]) == {"pi0", str(tmp_path / "runs" / "offline")}
    for r in result["against"].values():
        assert r["wins"] + r["losses"] + r["ties"] + r["failed"] == 2  # 2 prompts x 1 sample
    assert "| pi0 |" in out.stdout
    out = cli("compare", str(tmp_path / "runs" / "online"), str(tmp_path / "runs" / "offline"),
              "--out", str(tmp_path / "cmp"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "cmp" / "frontier.png").exists() and "online" in out.stdout
    # Same prompts and pairs: offline sampled its 8 prompts once from pi0, online 4 per round.
    assert "WARNING: budgets differ in prompts" not in out.stdout
    assert "WARNING: budgets differ in sampled_tokens" not in out.stdout


def test_online_kto_labels_samples_by_score(tiny_model_dir, prompts_file, tmp_path):
    data = tiny_recipe_dict(tiny_model_dir, prompts_file, tmp_path / "runs",
                            loss={"loss_type": "kto", "beta": 0.1})
    r, rows = run(data)
    examples = datasets.load_from_disk(str(r.round_dir(1) / "pairs"))
    assert set(examples.column_names) >= {"prompt", "completion", "label"}  # TRL's KTO format
    summary = json.loads((r.round_dir(1) / "pairs.json").read_text())
    assert summary["desirable"] > 0 and summary["undesirable"] > 0
    assert rows[0]["train_examples"] == summary["examples"] and rows[0]["optimizer_steps"] > 0
    # The completions' reference log-probs are the sampler's (pi_0 sampled them and is the
    # reference); their mismatched pairs for KTO's z0 were never sampled, so those are forwards.
    assert rows[0]["reference_logps_from"] == "mixed"
    assert "kto_reference_point" in json.loads((r.round_dir(1) / "train.json").read_text())


def test_offline_kto_from_a_labelled_dataset(tiny_model_dir, prompts_file, tmp_path):
    path = tmp_path / "kto.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Colour {i}?", "completion": c, "label": ok}) + "\n"
                            for i in range(4) for c, ok in (("Blue.", True), ("No idea, sorry!!", False))))
    data = tiny_recipe_dict(tiny_model_dir, prompts_file, tmp_path / "runs", mode="offline",
                            loss={"loss_type": "kto"}, **{"data.pairs": str(path)})
    r, rows = run(data)
    assert rows[0]["train_examples"] == 8 and rows[0]["reference_logps_from"] == "forward"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "completion": "y", "label": "yes"}) + "\n")
    from online_dpo.data.prompts import DatasetError

    with pytest.raises(DatasetError, match="row 0: column 'label' must be true/false"):
        run({**data, "name": "bad", "data": {**data["data"], "pairs": str(bad)}})


def test_kto_needs_a_pointwise_judge(tiny_model_dir, prompts_file, tmp_path):
    from online_dpo.config.recipe import RecipeError

    data = tiny_recipe_dict(tiny_model_dir, prompts_file, tmp_path / "runs", loss={"loss_type": "kto"},
                            judge={"target": "tests.test_judges:PreferShorter"})
    with pytest.raises(RecipeError, match="not a pointwise judge"):
        run(data)


def test_offline_kto_from_pi0_samples(tiny_model_dir, prompts_file, tmp_path):
    """mode: offline, KTO, no data.pairs: round_0/ samples pi_0 once and labels its samples."""
    data = tiny_recipe_dict(tiny_model_dir, prompts_file, tmp_path / "runs", mode="offline",
                            loss={"loss_type": "kto"}, **{"reference.schedule": "fixed"})
    r, rows = run(data)
    pool = datasets.load_from_disk(str(r.round_dir(0) / "pairs"))
    assert set(pool["sampler_round"]) == {0} and "label" in pool.column_names
    per_round = [json.loads((r.round_dir(k) / "pairs.json").read_text()) for k in (1, 2)]
    prompts = [set(datasets.load_from_disk(str(r.round_dir(k) / "pairs"))["prompt_index"]) for k in (1, 2)]
    assert all(len(p) <= 4 for p in prompts) and not prompts[0] & prompts[1]  # each round its own prompts
    assert [row["train_examples"] for row in rows] == [p["examples"] for p in per_round]
    assert all(row["optimizer_steps"] > 0 for row in rows)


def test_swap_every_two_rounds_with_pruned_checkpoints(tiny_model_dir, prompts_file, tmp_path):
    data = tiny_recipe_dict(tiny_model_dir, prompts_file, tmp_path / "runs", rounds=3, keep_checkpoints=1,
                            reference={"schedule": "swap", "swap_every_rounds": 2})
    r, rows = run(data)
    assert [row["reference_source_round"] for row in rows] == [0, 2, 2]
    # Round 1 was sampled by pi_0 (the reference); round 2 by the round-1 policy against pi_0;
    # round 3 by the round-2 policy, which is the reference since the swap after round 2.
    assert [row["reference_logps_from"] for row in rows] == ["sampler", "forward", "sampler"]
    # keep_checkpoints 1 keeps the newest, and round 2's, which the reference was loaded from.
    assert [(r.round_dir(k) / "checkpoint").exists() for k in (1, 2, 3)] == [False, True, True]


def test_ema_with_rate_below_one_resumes_to_the_same_reference(tiny_model_dir, prompts_file, tmp_path):
    import signal

    import yaml
    from safetensors.torch import load_file

    recipe = tmp_path / "ema.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(
        tiny_model_dir, prompts_file, tmp_path / "runs",
        reference={"schedule": "ema", "ema_every_steps": 2, "ema_rate": 0.5})))
    assert cli("run", str(recipe), "name=straight").returncode == 0
    killed = cli("run", str(recipe), "name=killed", kill_at="round_2/train_step_1")
    assert killed.returncode == -signal.SIGKILL
    resumed = cli("run", str(recipe), "name=killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    runs = tmp_path / "runs"
    for k in (1, 2):
        a = load_file(runs / "straight" / f"round_{k}" / "reference_checkpoint" / "model.safetensors")
        b = load_file(runs / "killed" / f"round_{k}" / "reference_checkpoint" / "model.safetensors")
        assert all(torch.equal(a[key], b[key]) for key in a), k
    base = load_file(tiny_model_dir / "model.safetensors")
    policy = load_file(runs / "straight" / "round_2" / "checkpoint" / "model.safetensors")
    ref = load_file(runs / "straight" / "round_2" / "reference_checkpoint" / "model.safetensors")
    # A blend: moved away from pi_0, and not equal to the policy (rate 0.5 < 1).
    assert any(not torch.equal(ref[key], base[key]) for key in base)
    assert any(not torch.equal(ref[key], policy[key]) for key in policy)
    straight = [json.loads(x) for x in (runs / "straight" / "metrics.jsonl").read_text().splitlines()]
    killed_rows = [json.loads(x) for x in (runs / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [row["loss"] for row in straight] == [row["loss"] for row in killed_rows]
    assert all(row["reference_source_round"] is None for row in straight)  # a blend is no round
