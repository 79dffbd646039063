import math
import random

import pytest

from judges.loading import JudgeLoadError, build_judge, validate_judge_target
from judges.protocol import Judgment, PairwiseJudge, PointwiseAsPairwise, PointwiseJudge, Preference
from judges.rules import ConciseAnswerJudge
from online_dpo.pairs import FAILED, KEPT, TIE, judge_samples

ROW = {"prompt": "Tell me one interesting fact about volcanoes."}


def test_concise_judge_scoring_function():
    j = ConciseAnswerJudge(max_words=60)
    # 4 words: brevity 1 - 4/60, ends a sentence, mentions "volcanoes".
    assert j.score(ROW, "Volcanoes can create islands.") == pytest.approx(1 - 4 / 60 + 1 + 1)
    # Cut off mid-sentence and off-topic: brevity only.
    assert j.score(ROW, "The weather today is rather") == pytest.approx(1 - 5 / 60)
    assert j.score(ROW, "Hi.") == 0.0  # below min_words
    assert j.score(ROW, " ".join(["word"] * 70)) == 0.0


def test_pointwise_serves_as_pairwise():
    judge = PointwiseAsPairwise(ConciseAnswerJudge())
    assert isinstance(judge, PairwiseJudge) and isinstance(judge, PointwiseJudge)
    j = judge.judge(ROW, "Volcanoes erupt lava.", "The weather today is rather")
    assert j.preference == Preference.FIRST and j.first_score > j.second_score
    assert judge.judge(ROW, "Same text here.", "Same text here.").preference == Preference.TIE


class Lengthy:
    def score(self, row, completion):
        return float(len(completion))


class Crashes:
    def score(self, row, completion):
        raise RuntimeError("backend down")


class NaNs:
    def score(self, row, completion):
        return math.nan


class Garbage:
    def judge(self, row, first, second):
        return "first"


class PreferShorter:
    def judge(self, row, first, second):
        if len(first) == len(second):
            return Judgment(Preference.TIE, "same length")
        return Judgment(Preference.FIRST if len(first) < len(second) else Preference.SECOND, "shorter")


def test_best_vs_worst_pointwise():
    rec = judge_samples(Lengthy(), ROW, ["aa", "a", "aaaa", "aaa"], "best_vs_worst", random.Random(0))
    assert rec["status"] == KEPT and rec["chosen"] == 2 and rec["rejected"] == 1
    assert rec["scores"] == [2.0, 1.0, 4.0, 3.0]


def test_ties_are_dropped_never_given_to_a_side():
    rec = judge_samples(Lengthy(), ROW, ["ab", "cd", "ef"], "best_vs_worst", random.Random(0))
    assert rec["status"] == TIE and rec["chosen"] is None and rec["rejected"] is None


@pytest.mark.parametrize("judge, reason", [(Crashes(), "RuntimeError: backend down"),
                                           (NaNs(), "non-finite")])
def test_failing_pointwise_judges_are_recorded(judge, reason):
    rec = judge_samples(judge, ROW, ["a", "bb"], "best_vs_worst", random.Random(0))
    assert rec["status"] == FAILED and reason in rec["reason"]


def test_garbage_pairwise_answer_is_a_failure():
    rec = judge_samples(Garbage(), ROW, ["a", "bb"], "random", random.Random(0))
    assert rec["status"] == FAILED and "not a Judgment" in rec["reason"]


def test_round_robin_for_pairwise_only_judges():
    rec = judge_samples(PreferShorter(), ROW, ["aaa", "a", "aa"], "best_vs_worst", random.Random(0))
    assert rec["status"] == KEPT and rec["chosen"] == 1 and rec["rejected"] == 0
    assert len(rec["comparisons"]) == 3


def test_random_pair_strategy_uses_two_distinct_samples():
    rec = judge_samples(PointwiseAsPairwise(Lengthy()), ROW, ["a", "bb", "ccc", "dddd"], "random",
                        random.Random(1))
    assert rec["status"] == KEPT and rec["chosen"] != rec["rejected"]
    assert len(rec["comparisons"]) == 1


def test_build_judge_by_dotted_path():
    judge = build_judge("judges.rules:ConciseAnswerJudge", {"max_words": 10})
    assert isinstance(judge, PointwiseAsPairwise) and judge.inner.max_words == 10
    assert isinstance(build_judge("tests.test_judges:PreferShorter", {}), PreferShorter)


@pytest.mark.parametrize(
    "target, kwargs, message",
    [
        ("no_such_module:Judge", {}, "cannot import module 'no_such_module'"),
        ("judges.rules:NoSuchJudge", {}, "has no 'NoSuchJudge'"),
        ("judges.rules:ConciseAnswerJudge", {"max_wrods": 3}, "do not fit"),
        ("judges_rules", {}, "not of the form"),
        ("judges.rules", {}, "not a class"),
        ("judges.rules:re", {}, "not a class"),
        ("judges.protocol:Judgment", {}, "neither judge"),
    ],
)
def test_bad_judge_targets_fail_clearly(target, kwargs, message):
    with pytest.raises(JudgeLoadError, match=message):
        validate_judge_target(target, kwargs)
