"""The shipped judge recipes' judge sections, each in a short real run on the tiny model."""

import json
import re
from pathlib import Path

import pytest

from judges.loading import build_judge
from online_dpo.config.recipe import load_recipe, recipe_from_dict, recipe_to_dict
from online_dpo.pipeline.run import Run
from tests.conftest import REPO, tiny_recipe_dict


def judge_section(name):
    return recipe_to_dict(load_recipe(REPO / "recipes" / "judges" / f"{name}.yaml"))["judge"]


def test_gold_answer_recipe(tiny_model_dir, tmp_path):
    recipe = load_recipe(REPO / "recipes" / "judges" / "gold_answer.yaml")
    data = tiny_recipe_dict(tiny_model_dir, recipe.data.prompts, tmp_path / "runs", rounds=1,
                            judge=judge_section("gold_answer"))
    rows = Run(recipe_from_dict(data)).execute()
    # A random tiny model never says the right number: every prompt is a 0-vs-0 tie, dropped.
    assert rows[0]["pairs_tied"] == 4 and rows[0]["judge_score"] == 0.0
    judgments = (tmp_path / "runs" / "tiny" / "round_1" / "judgments.jsonl").read_text()
    assert "all scores equal" in judgments
    # Not a judge that always says 0: the recipe's judge credits the row's gold answer.
    section = judge_section("gold_answer")
    judge = build_judge(section["target"], section["kwargs"])
    row = json.loads(Path(recipe.data.prompts).read_text().splitlines()[0])
    assert judge.score(row, f"It is {row['answer']}.") == 1.0
    assert judge.score(row, f"It is 1{row['answer']}.") == 0.0


def test_majority_vote_recipe_records_agreement(tiny_model_dir, prompts_file, tmp_path):
    data = tiny_recipe_dict(tiny_model_dir, prompts_file, tmp_path / "runs", rounds=1,
                            judge=judge_section("majority_vote"), **{"pairs.strategy": "random"})
    rows = Run(recipe_from_dict(data)).execute()
    assert rows[0]["pairs_kept"] + rows[0]["pairs_dropped"] == 4
    assert rows[0]["position_flip_rate"] == 0.0  # rule judges have no position bias
    # Every verdict is the vote of the recipe's three judges, e.g. "majority 2/3 (first=2, second=1)";
    # vote_agreement is the mean share of the winning answer (the same in both orders).
    judgments = (tmp_path / "runs" / "tiny" / "round_1" / "judgments.jsonl").read_text().splitlines()
    shares = []
    for line in judgments:
        (comparison,) = json.loads(line)["comparisons"]  # pairs.strategy random: one pair
        tally = dict(re.findall(r"(first|second|tie)=(\d+)", comparison["reason"]))
        counts = [int(n) for n in tally.values()]
        assert sum(counts) == 3, comparison["reason"]
        shares.append(max(counts) / 3)
    assert len(shares) == 4 and rows[0]["vote_agreement"] == pytest.approx(sum(shares) / 4)


def test_majority_vote_arithmetic():
    from judges.protocol import Judgment, Preference
    from judges.vote import MajorityVote

    vote = MajorityVote(judges=[{"target": "judges.rules:ConciseAnswerJudge"} for _ in range(3)], quorum=0.5)

    def answers(*prefs):
        for voter, pref in zip(vote.voters, prefs):
            voter.judge = lambda row, a, b, p=pref: Judgment(p, "")

    row = {"prompt": "x"}
    answers(Preference.FIRST, Preference.FIRST, Preference.SECOND)
    assert vote.judge(row, "a", "b").preference == Preference.FIRST
    answers(Preference.FIRST, Preference.SECOND, Preference.TIE)
    assert vote.judge(row, "a", "b").preference == Preference.TIE  # no side has > 50%
    answers(Preference.FIRST, Preference.FAILED, Preference.SECOND)
    assert vote.judge(row, "a", "b").preference == Preference.TIE  # 1-1 among valid votes
    answers(Preference.FAILED, Preference.FAILED, Preference.SECOND)
    assert vote.judge(row, "a", "b").preference == Preference.SECOND  # 1/1 valid vote
    answers(Preference.FAILED, Preference.FAILED, Preference.FAILED)
    assert vote.judge(row, "a", "b").preference == Preference.FAILED
    stats = vote.pop_stats()
    assert stats["vote_agreement"] == pytest.approx((2 / 3 + 1 / 3 + 1 / 2 + 1) / 4)
    assert stats["vote_unanimous_rate"] == pytest.approx(1 / 4)


def test_k_samples_of_one_judge_reuse_one_object():
    from judges.vote import MajorityVote

    vote = MajorityVote(judge={"target": "judges.rules:ConciseAnswerJudge"}, samples=3)
    assert len(vote.voters) == 3 and len({id(v) for v in vote.voters}) == 1


def test_function_judges(tmp_path, monkeypatch):
    from judges.functions import PairwiseFunction, PointwiseFunction
    from judges.protocol import Preference

    (tmp_path / "my_rules.py").write_text(
        "def exact(row, completion):\n    return float(completion.strip() == row['answer'])\n"
        "def shorter(row, a, b):\n    return 'first' if len(a) < len(b) else 'second'\n"
        "def bad(row, a, b):\n    return 'maybe'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert PointwiseFunction("my_rules:exact").score({"answer": "7"}, " 7 ") == 1.0
    assert PairwiseFunction("my_rules:shorter").judge({}, "a", "bb").preference == Preference.FIRST
    with pytest.raises(ValueError, match="expected first/second/tie"):
        PairwiseFunction("my_rules:bad").judge({}, "a", "b")


def test_endpoint_and_reward_model_recipes_name_real_components():
    for name in ("llm_endpoint", "reward_model"):
        section = judge_section(name)
        from judges.loading import validate_judge_target

        validate_judge_target(section["target"], section["kwargs"])
    assert json.dumps(judge_section("llm_endpoint")).count("sk-") == 0
