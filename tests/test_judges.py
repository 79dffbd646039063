import math
import random

import pytest

from judges.bias import BothOrders
from judges.loading import JudgeLoadError, build_judge, validate_judge_target
from judges.protocol import Judgment, PairwiseJudge, PointwiseAsPairwise, PointwiseJudge, Preference
from judges.reliable import JudgeCache, ReliableJudge
from judges.rules import ConciseAnswerJudge
from online_dpo.pipeline.pair_selection import FAILED, KEPT, TIE, judge_prompts, judge_samples

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


def stack(judge, **kwargs):
    """The judge as the pipeline sees it: behind the fault-tolerance layer, with no real sleeps."""
    if not hasattr(judge, "judge"):
        judge = PointwiseAsPairwise(judge)
    kwargs.setdefault("sleep", lambda s: None)
    return ReliableJudge(judge, fingerprint="test", **kwargs)


def test_best_vs_worst_pointwise():
    rec = judge_samples(stack(Lengthy()), ROW, ["aa", "a", "aaaa", "aaa"], "best_vs_worst")
    assert rec["status"] == KEPT and rec["chosen"] == 2 and rec["rejected"] == 1
    assert rec["scores"] == [2.0, 1.0, 4.0, 3.0]


def test_ties_are_dropped_never_given_to_a_side():
    rec = judge_samples(stack(Lengthy()), ROW, ["ab", "cd", "ef"], "best_vs_worst")
    assert rec["status"] == TIE and rec["chosen"] is None and rec["rejected"] is None


@pytest.mark.parametrize("judge, reason", [(Crashes(), "RuntimeError: backend down"),
                                           (NaNs(), "non-finite")])
def test_failing_pointwise_judges_are_recorded(judge, reason):
    rec = judge_samples(stack(judge), ROW, ["a", "bb"], "best_vs_worst")
    assert rec["status"] == FAILED and reason in rec["reason"]


def test_garbage_pairwise_answer_is_a_failure():
    rec = judge_samples(stack(Garbage()), ROW, ["a", "bb"], "random", random.Random(0).sample(range(2), 2))
    assert rec["status"] == FAILED and "not a Judgment" in rec["reason"]
    assert "failed after 3 attempts" in rec["reason"]


def test_round_robin_for_pairwise_only_judges():
    rec = judge_samples(stack(PreferShorter()), ROW, ["aaa", "a", "aa"], "best_vs_worst")
    assert rec["status"] == KEPT and rec["chosen"] == 1 and rec["rejected"] == 0
    assert len(rec["comparisons"]) == 3


def test_random_pair_strategy_uses_two_distinct_samples():
    texts = ["a", "bb", "ccc", "dddd"]
    drawn = set()
    for seed in range(20):
        (rec,) = judge_prompts(stack(Lengthy()), [(ROW, texts)], "random", random.Random(seed))
        assert rec["status"] == KEPT and rec["chosen"] != rec["rejected"]
        (comparison,) = rec["comparisons"]  # one judge call: the drawn pair
        assert {comparison["first"], comparison["second"]} == {rec["chosen"], rec["rejected"]}
        assert len(texts[rec["chosen"]]) > len(texts[rec["rejected"]])  # the judge's winner
        drawn.add(frozenset((rec["chosen"], rec["rejected"])))
    assert len(drawn) >= 4  # drawn at random, not the same pair (nor best vs worst) every time


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


class Flaky:
    """Raises on the first `failures` calls, then answers."""

    def __init__(self, failures):
        self.failures = failures
        self.calls = 0

    def score(self, row, completion):
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError("transient")
        return float(len(completion))


def test_retries_with_exponential_backoff_then_success():
    sleeps = []
    judge = stack(Flaky(2), retries=2, backoff_s=0.5, sleep=sleeps.append)
    assert judge.score(ROW, "abc") == (3.0, "")
    # backoff_s, doubling, each plus up to 10% jitter
    assert 0.5 <= sleeps[0] <= 0.55 and 1.0 <= sleeps[1] <= 1.1 and len(sleeps) == 2
    assert judge.pop_stats()["judge_retries"] == 2
    exact = stack(Flaky(2), retries=2, backoff_s=0.5, sleep=sleeps.append, jitter=0.0)
    assert exact.score(ROW, "abc") == (3.0, "") and sleeps[2:] == [0.5, 1.0]


def test_retries_are_bounded():
    judge = stack(Flaky(10), retries=1)
    value, reason = judge.score(ROW, "abc")
    assert value is None and "failed after 2 attempts: ConnectionError: transient" in reason


class Slow:
    def score(self, row, completion):
        import time

        time.sleep(5)
        return 1.0


def test_timeout_becomes_a_failure_quickly():
    import time

    t0 = time.perf_counter()
    value, reason = stack(Slow(), retries=1, timeout_s=0.2).score(ROW, "abc")
    assert value is None and "no answer within 0.2s" in reason
    assert time.perf_counter() - t0 < 2


def test_cache_means_never_paying_twice(tmp_path):
    inner = Flaky(0)
    judge = stack(inner, cache=JudgeCache(tmp_path / "cache.jsonl"))
    judge.score(ROW, "abcd")
    judge.score(ROW, "abcd")
    assert inner.calls == 1
    # A new process (a resumed run) reads the cache file back.
    inner2 = Flaky(0)
    judge2 = stack(inner2, cache=JudgeCache(tmp_path / "cache.jsonl"))
    assert judge2.score(ROW, "abcd") == (4.0, "") and inner2.calls == 0
    # A torn last line from a kill mid-write is ignored.
    with open(tmp_path / "cache.jsonl", "a") as f:
        f.write('{"key": "abc", "val')
    assert len(JudgeCache(tmp_path / "cache.jsonl")) == 1


class AlwaysFirst:
    def judge(self, row, first, second):
        return Judgment(Preference.FIRST, "position bias")


def test_both_orders_turns_position_bias_into_ties():
    judge = BothOrders(stack(AlwaysFirst()))
    assert judge.judge(ROW, "a", "b").preference == Preference.TIE
    assert judge.pop_stats() == {"position_flip_rate": 1.0}
    consistent = BothOrders(stack(PreferShorter()), disagreement="failed")
    assert consistent.judge(ROW, "a", "bb").preference == Preference.FIRST
    assert consistent.judge(ROW, "bb", "a").preference == Preference.SECOND
    assert consistent.pop_stats() == {"position_flip_rate": 0.0}
    assert BothOrders(stack(AlwaysFirst()), "failed").judge(ROW, "a", "b").preference == Preference.FAILED


def test_length_control_ties_much_longer_winners():
    texts = ["one two three four five six", "one"]
    rec = judge_samples(stack(Lengthy()), ROW, texts, "best_vs_worst", max_length_ratio=2.0)
    assert rec["status"] == TIE and "length control" in rec["reason"]
    rec = judge_samples(stack(Lengthy()), ROW, texts, "best_vs_worst", max_length_ratio=10.0)
    assert rec["status"] == KEPT


def test_unknown_plugin_name_names_the_entry_point_group():
    with pytest.raises(JudgeLoadError, match="online_dpo.judges"):
        validate_judge_target("not_registered_anywhere", {})


def test_entry_point_plugins_resolve(tmp_path, monkeypatch):
    """A third-party package registers a judge under the online_dpo.judges group."""
    dist = tmp_path / "thirdparty_judges-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-judges\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[online_dpo.judges]\nconcise = judges.rules:ConciseAnswerJudge\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    judge = build_judge("concise", {"max_words": 5})
    assert isinstance(judge.inner, ConciseAnswerJudge) and judge.inner.max_words == 5
    assert judge.score(ROW, "Volcanoes erupt every year.") == pytest.approx(1 - 4 / 5 + 1 + 1)


def test_a_pointwise_judge_behind_both_orders_is_scored_not_compared():
    """A score does not depend on order: with judge.both_orders a pointwise judge still ranks n
    samples by n score calls, not by n(n-1) pairwise calls of two scores each."""
    reliable = stack(Lengthy())
    rec = judge_samples(BothOrders(reliable), ROW, ["aa", "a", "aaaa", "aaa"], "best_vs_worst")
    assert rec["scores"] == [2.0, 1.0, 4.0, 3.0] and (rec["chosen"], rec["rejected"]) == (2, 1)
    assert rec["comparisons"] == [] and reliable.pop_stats()["judge_calls"] == 4


def test_an_unset_eval_judge_shares_the_training_judge_instance(tiny_model_dir, prompts_file, tmp_path):
    """A reward model as training judge is loaded once, not again for held-out evaluation."""
    from online_dpo.config.recipe import recipe_from_dict
    from online_dpo.pipeline.run import Run
    from tests.conftest import tiny_recipe_dict

    shared = Run(recipe_from_dict(tiny_recipe_dict(tiny_model_dir, prompts_file, tmp_path))).build_judges([], [])
    assert shared[1].inner is shared[0].inner and shared[2].inner is shared[0].inner
    other = Run(recipe_from_dict(tiny_recipe_dict(tiny_model_dir, prompts_file, tmp_path, **{
        "eval.judge": {"target": "judges.rules:InformativeAnswerJudge"}}))).build_judges([], [])
    assert other[1].inner is not other[0].inner


def test_gold_answer_judges_refuse_rows_without_a_usable_gold_answer_at_load():
    from judges.functions import ExactAnswerJudge, GoldAnswerJudge

    rows = [{"prompt": "2+2?", "answer": "4"}, {"prompt": "3+3?"}]
    for judge in (GoldAnswerJudge(), ExactAnswerJudge()):
        with pytest.raises(KeyError, match="prompt row 1 has no gold answer in column 'answer'"):
            judge.check_rows(rows)
    with pytest.raises(ValueError, match="prompt row 0: gold answer 'four' is not a number"):
        ExactAnswerJudge().check_rows([{"prompt": "2+2?", "answer": "four"}])
    ExactAnswerJudge().check_rows(rows[:1])
