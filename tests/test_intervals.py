"""The gaming alarm on constructed data, and a round's intervals read from files on disk."""

import json
import re

import numpy as np
import pytest

from online_dpo.analysis.round_report import markdown_table, round_line
from online_dpo.analysis.round_uncertainty import (
    alarm_message,
    eval_score_groups,
    gaming_alarm,
    gaming_check,
    round_intervals,
    win_groups,
)
from online_dpo.analysis.statistics import Interval, wilson

RNG = np.random.default_rng(0)


def scores(mean, n=40, spread=0.05):
    return [[float(v)] for v in RNG.normal(mean, spread, size=n)]


def test_alarm_fires_when_the_judge_climbs_and_held_out_falls():
    pi0 = scores(0.5)
    fallen = [[g[0] - 0.2 + float(RNG.normal(0, 0.01))] for g in pi0]  # paired: same prompts
    alarm = gaming_check(3, scores(0.8), scores(0.2), fallen, pi0, None)
    assert alarm["round"] == 3 and alarm["reasons"] == ["held-out eval score fell against pi_0"]
    assert alarm["judge_score_rise_since_round_1"] == pytest.approx(0.6, abs=0.05)
    assert alarm["judge_score_rise_ci"][0] > 0
    assert alarm["eval_score_vs_pi0"] == pytest.approx(-0.2, abs=0.01) and alarm["eval_score_vs_pi0_ci"][1] < 0
    message = alarm_message(alarm)
    assert re.match(r"WARNING: gaming alarm at round 3: training judge score rose \+0\.6\d\d "
                    r"\[\+0\.\d{3}, \+0\.\d{3}\] since round 1; held-out eval score vs pi_0 -0\.[12]\d\d "
                    r"\[-0\.\d{3}, -0\.\d{3}\] \(held-out eval score fell against pi_0\)", message)


def test_alarm_fires_on_a_win_rate_significantly_below_half():
    low = wilson(20 + 10 / 2, 100)  # 20 wins, 10 ties, 70 losses: 0.25 [0.17, 0.34]
    alarm = gaming_check(2, scores(0.8), scores(0.2), None, None, low)
    assert alarm["reasons"] == ["win rate against pi_0 below 0.5"]
    assert alarm["win_rate_vs_pi0"] == 0.25 and alarm["win_rate_vs_pi0_ci"] == low.ci
    assert "win rate vs pi_0 0.250 [0.1" in alarm_message(alarm)


@pytest.mark.parametrize("case", ["judge flat", "held-out steady", "held-out noisy", "round 1",
                                  "win rate uncertain"])
def test_alarm_stays_quiet(case):
    pi0 = scores(0.5)
    fallen = [[g[0] - 0.2] for g in pi0]
    steady = [[g[0] + float(RNG.normal(0, 0.01))] for g in pi0]
    if case == "judge flat":  # held-out fell, but the training judge did not rise
        assert gaming_check(3, scores(0.5), scores(0.5), fallen, pi0, None) is None
    elif case == "held-out steady":  # the judge rose and held-out quality held
        assert gaming_check(3, scores(0.8), scores(0.2), steady, pi0, wilson(50, 100)) is None
    elif case == "held-out noisy":  # a drop that 3 prompts cannot tell from noise
        small = [[0.1], [0.9], [0.5]]
        assert gaming_check(3, scores(0.8), scores(0.2), [[0.0], [0.9], [0.45]], small, None) is None
    elif case == "round 1":
        assert gaming_check(1, scores(0.8), scores(0.2), fallen, pi0, None) is None
    else:  # 0.4 from 10 comparisons: the interval still holds 0.5
        assert gaming_check(2, scores(0.8), scores(0.2), None, None, wilson(4, 10)) is None


def test_gaming_alarm_rule_on_intervals():
    rise, drop, win = Interval(0.3, 0.1, 0.5), Interval(-0.2, -0.3, -0.1), Interval(0.3, 0.2, 0.4)
    assert gaming_alarm(2, rise, drop, None)["reasons"] == ["held-out eval score fell against pi_0"]
    assert len(gaming_alarm(2, rise, drop, win)["reasons"]) == 2
    assert gaming_alarm(2, Interval(0.3, -0.01, 0.5), drop, win) is None  # rise not significant
    assert gaming_alarm(2, rise, Interval(-0.2, -0.3, 0.01), Interval(0.45, 0.3, 0.6)) is None
    assert gaming_alarm(2, None, drop, win) is None


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def eval_records(prompts, values, outcomes=None):
    records = []
    for i, (p, vs) in enumerate(zip(prompts, values)):
        rec = {"row": {"prompt": p}, "samples": [{"text": "x", "eval_score": v} for v in vs]}
        if outcomes is not None:
            rec["vs_pi0"] = outcomes[i]
        records.append(rec)
    return records


def test_round_intervals_from_files(tmp_path):
    prompts = [f"q{i}" for i in range(30)]
    write_jsonl(tmp_path / "round_1" / "judgments.jsonl", [{"scores": [0.1, 0.2]}] * 30)
    write_jsonl(tmp_path / "round_2" / "judgments.jsonl", [{"scores": [0.9, None]}] * 15 + [{"scores": [0.8]}] * 15)
    write_jsonl(tmp_path / "round_0" / "pi0_eval_samples.jsonl", eval_records(prompts, [[0.5, 0.6]] * 30))
    lose = {"wins": 0, "losses": 2, "ties": 0, "failed": 0}
    now = eval_records(prompts, [[0.2, 0.3]] * 30, [lose] * 30)
    write_jsonl(tmp_path / "round_2" / "eval_samples.jsonl", now)
    assert win_groups(now)[0] == [0.0, 0.0] and eval_score_groups(now)[0] == [0.2, 0.3]
    win = wilson(0, 60)
    metrics = {"eval_judge_score": 0.25, "win_rate_vs_pi0": 0.0, "win_rate_vs_pi0_ci": win.ci}
    out = round_intervals(tmp_path, 2, metrics)
    lo, hi = out["judge_score_ci"]  # prompts of 0.9 and of 0.8 (a failed score dropped)
    assert 0.8 < lo < 0.85 < hi < 0.9
    assert out["eval_score_vs_pi0"] == pytest.approx(-0.3) and out["eval_score_vs_pi0_ci"] == pytest.approx([-0.3, -0.3])
    alarm = out["gaming_alarm"]
    assert alarm["judge_score_rise_since_round_1"] == pytest.approx(0.85 - 0.15)
    assert metrics["win_rate_vs_pi0_ci"][1] < 0.5
    assert len(alarm["reasons"]) == 2
    # Round 1 has the interval and no alarm; other held-out prompts are not paired with pi_0's.
    assert set(round_intervals(tmp_path, 1, {})) == {"judge_score_ci"}
    write_jsonl(tmp_path / "round_2" / "eval_samples.jsonl", eval_records(prompts[::-1], [[0.2, 0.3]] * 30))
    out = round_intervals(tmp_path, 2, {"eval_judge_score": 0.25})
    assert "eval_score_vs_pi0" not in out and "gaming_alarm" not in out


def test_round_line_and_table_show_intervals():
    metrics = {"round": 2, "judge_score": 0.5, "judge_score_ci": [0.4, 0.6], "loss": 0.69,
               "eval_judge_score": 0.41, "eval_judge_score_ci": [0.33, 0.49],
               "win_rate_vs_pi0": 0.5, "win_rate_vs_pi0_ci": [0.3, 0.7]}
    line = round_line(2, metrics)
    assert line == ("[online-dpo] round 2: judge_score=0.5, loss=0.69, eval_score=0.41 [0.33, 0.49], "
                    "win_rate_vs_pi0=0.50 [0.30, 0.70]")
    table = markdown_table([metrics])
    assert "| 0.500 [0.40, 0.60] | 0.410 [0.33, 0.49] |" in table and "| 0.50 [0.30, 0.70] |" in table
    alarm = gaming_alarm(2, Interval(0.3, 0.1, 0.5), Interval(-0.2, -0.3, -0.1), None)
    assert table.count("WARNING") == 0
    assert markdown_table([{**metrics, "gaming_alarm": alarm}]).endswith(alarm_message(alarm))
