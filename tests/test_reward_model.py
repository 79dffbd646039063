"""Reward-model judge and `online-dpo train-rm`, on real files and real models."""

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

from judges.reward_model import RewardModelJudge, format_for_reward_model
from online_dpo.config.recipe import recipe_from_dict
from online_dpo.data.prompts import DatasetError
from online_dpo.pipeline.run import Run
from online_dpo.training.reward_model_training import load_pairs
from tests.conftest import REPO, cli, tiny_recipe_dict

RM_TEMPLATE = ("{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}\n{% endfor %}")


@pytest.fixture(scope="module")
def tiny_rm_dir(smollm2_dir, tmp_path_factory):
    """A tiny random reward model whose tokenizer has its *own* chat template."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    tokenizer.chat_template = RM_TEMPLATE
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=16, num_labels=1, pad_token_id=2)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-rm")
    LlamaForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_reward_model_uses_its_own_chat_template(tiny_rm_dir):
    judge = RewardModelJudge(str(tiny_rm_dir))
    text = format_for_reward_model(judge.tokenizer, {"prompt": "Hi?"}, "Hello.")
    assert text == "[USER] Hi?\n[ASSISTANT] Hello.\n"  # not the policy's <|im_start|> format
    batch = judge.score_batch([({"prompt": "Hi?"}, "Hello."), ({"prompt": "Hi?"}, "Go away")])
    assert len(batch) == 2 and batch[0] == pytest.approx(judge.score({"prompt": "Hi?"}, "Hello."), abs=1e-5)
    # The scores are the model's output on that text, in the reward model's format.
    for completion, score in zip(("Hello.", "Go away"), batch):
        text = f"[USER] Hi?\n[ASSISTANT] {completion}\n"
        ids = judge.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            assert score == pytest.approx(judge.model(**ids).logits[0, 0].item(), abs=1e-5)
    assert batch[0] != pytest.approx(batch[1], abs=1e-4)


def test_reward_model_device_key(tiny_rm_dir):
    """`device` places the judge (on a shared GPU, its own); "auto" is the first GPU, else CPU."""
    assert RewardModelJudge(str(tiny_rm_dir), device="cpu").model.device.type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda:1' needs CUDA"):
            RewardModelJudge(str(tiny_rm_dir), device="cuda:1")


def test_reward_model_judge_in_a_run(tiny_model_dir, tiny_rm_dir, prompts_file, tmp_path):
    data = tiny_recipe_dict(tiny_model_dir, prompts_file, tmp_path / "runs", rounds=1,
                            judge={"target": "judges.reward_model:RewardModelJudge",
                                   "kwargs": {"path": str(tiny_rm_dir), "batch_size": 4}})
    rows = Run(recipe_from_dict(data)).execute()
    assert rows[0]["pairs_kept"] == 4  # continuous scores: no ties
    assert rows[0]["judge_calls"] == 1  # one batched call across the round's prompts
    assert rows[0]["reward_model_truncated"] == 0
    assert rows[0]["judge_score"] is not None


def test_pairs_errors_name_the_column_and_row(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "Hi", "chosen": "a"}) + "\n")
    with pytest.raises(DatasetError, match="missing column 'rejected'"):
        load_pairs(str(path))
    path.write_text(json.dumps({"prompt": "Hi", "chosen": "a", "rejected": "b"}) + "\n"
                    + json.dumps({"prompt": "Hi", "chosen": "", "rejected": "b"}) + "\n")
    with pytest.raises(DatasetError, match="row 1: column 'chosen' is empty"):
        load_pairs(str(path))


@pytest.mark.slow
def test_trained_reward_model_agrees_with_the_runs_judge(tiny_model_dir, tmp_path):
    """Pairs labelled by the rule judge in a real run; a SmolLM2 reward model trained on 70% of
    them must agree with that judge on the held-out 30% well above chance (0.5)."""
    prompts = tmp_path / "prompts.jsonl"
    rows = [json.loads(x) for x in (REPO / "recipes" / "data" / "prompts.jsonl").read_text().splitlines()]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows[:60]))
    data = tiny_recipe_dict(tiny_model_dir, prompts, tmp_path / "runs", rounds=1,
                            **{"data.prompts_per_round": 56, "generation.samples_per_prompt": 4, "generation.max_tokens": 16})
    Run(recipe_from_dict(data)).execute()
    pairs = tmp_path / "runs" / "tiny" / "round_1" / "pairs"
    out = tmp_path / "rm"
    result = cli("train-rm", str(pairs), "--out", str(out), "--eval-fraction", "0.3", "--lr", "2e-5")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "reward_model_metrics.json").read_text())
    assert metrics["held_out_pairs"] >= 15
    assert metrics["held_out_accuracy"] >= 0.75, metrics
    # The saved folder is a judge: it scores the held-out pairs as the trained model did.
    held_out = [json.loads(x) for x in (out / "held_out_pairs.jsonl").read_text().splitlines()]
    assert len(held_out) == metrics["held_out_pairs"]
    judge = RewardModelJudge(str(out), dtype="float32")
    chosen = judge.score_batch([(p["row"], p["chosen"]) for p in held_out])
    rejected = judge.score_batch([(p["row"], p["rejected"]) for p in held_out])
    assert chosen == pytest.approx([p["chosen_reward"] for p in held_out], abs=1e-3)
    assert rejected == pytest.approx([p["rejected_reward"] for p in held_out], abs=1e-3)
    assert [c > r for c, r in zip(chosen, rejected)] == [
        p["chosen_reward"] > p["rejected_reward"] for p in held_out]
    assert sum(c > r for c, r in zip(chosen, rejected)) / len(held_out) == metrics["held_out_accuracy"]
    # ... and those are the run's own pairs: each held-out pair is one the rule judge picked.
    picked = {(json.dumps(r["row"]["prompt"], sort_keys=True), r["chosen"], r["rejected"]) for r in load_pairs(str(pairs))}
    assert all((json.dumps(p["row"]["prompt"], sort_keys=True), p["chosen"], p["rejected"]) in picked for p in held_out)


def test_length_batches_group_similar_lengths_under_both_bounds():
    from judges.reward_model import length_batches

    lengths = [50, 3, 40, 7, 45, 5, 300]
    batches = length_batches(lengths, max_seqs=3, max_tokens=120)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3 and (len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 120)
    assert batches[0] == [1, 5, 3]  # the shortest together
    assert [6] in batches  # too long to share: alone


def test_reward_model_batches_across_prompts_and_keeps_the_end_of_a_long_sample(tiny_rm_dir):
    from judges.reliable import ReliableJudge

    judge = RewardModelJudge(str(tiny_rm_dir), max_length=24, batch_size=3)
    rows = [{"prompt": f"Question {i}?"} for i in range(4)]
    items = [(row, answer) for row in rows for answer in ("Yes.", "No, not at all.", "Maybe later.")]
    together = judge.score_batch(items)
    alone = [judge.score(row, answer) for row, answer in items]
    assert together == pytest.approx(alone, abs=1e-5)  # sorting and padding change no score
    assert judge.pop_stats() == {"reward_model_truncated": 0}
    long_a = ("word " * 40) + "The answer is yes."
    long_b = ("word " * 40) + "The answer is no."
    a, b = judge.score_batch([(rows[0], long_a), (rows[0], long_b)])
    assert a != pytest.approx(b, abs=1e-6)  # cut at the start: the differing ends are scored
    assert judge.pop_stats() == {"reward_model_truncated": 2}
    strict = ReliableJudge(RewardModelJudge(str(tiny_rm_dir), max_length=24, on_truncation="fail"), fingerprint="s")
    (short, _), (failed, reason) = strict.score_many(rows[0], ["Yes.", long_a])
    assert short is not None and failed is None and "longer than max_length=24" in reason


def test_prefetch_scores_a_round_in_one_call_with_the_same_results(tiny_rm_dir):
    import random

    from judges.reliable import ReliableJudge
    from online_dpo.pipeline.pair_selection import judge_prompts

    prompts = [({"prompt": f"Question {i}?"}, ["Yes.", "No, not at all.", "Maybe later, if at all."]) for i in range(6)]
    records = {}
    for prefetch in (False, True):
        model = RewardModelJudge(str(tiny_rm_dir))
        calls = []
        batch = model.score_batch
        model.score_batch = lambda items, batch=batch, calls=calls: calls.append(len(items)) or batch(items)
        judge = ReliableJudge(model, fingerprint="p")
        if prefetch:
            judge.prefetch_scores([(row, t) for row, texts in prompts for t in texts])
        records[prefetch] = list(judge_prompts(judge, prompts, "best_vs_worst", random.Random(0)))
        assert calls == ([18] if prefetch else [3] * 6)  # one call across prompts, or one per prompt
        assert judge.pop_stats()["judge_cache_hits"] == 0  # paid for this round, not a resume's hit
    for a, b in zip(records[True], records[False], strict=True):  # other batches: float rounding only
        assert (a["status"], a["chosen"], a["rejected"]) == (b["status"], b["chosen"], b["rejected"])
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-6)
