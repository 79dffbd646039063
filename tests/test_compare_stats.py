"""`compare` with per-prompt held-out values: significance, paired vs unpaired, the smallest
detectable difference, gaming alarms, and arms of several seeds (synthetic run directories)."""

import json

import numpy as np
import pytest
import yaml

from online_dpo.analysis.compare_command import compare, load_run
from online_dpo.analysis.run_comparison import (
    arm_groups,
    arms_figure,
    arms_summary,
    pairwise,
    significance_section,
)

RNG = np.random.default_rng(0)


def make_run(root, name, scores, wins, *, seed=0, beta=0.1, prompts=None, alarm=None):
    """A finished 2-round run whose round 2 evaluated `scores` (per prompt, per sample) and won
    `wins` (per prompt: (wins, losses, ties)) against pi_0; round 1 was not evaluated."""
    prompts = prompts or [f"Question {i}?" for i in range(len(scores))]
    run_dir = root / name
    (run_dir / "round_2").mkdir(parents=True)
    records = [{"row": {"prompt": p}, "samples": [{"text": "x", "eval_score": v} for v in s],
                "vs_pi0": {"wins": w, "losses": lo, "ties": t, "failed": 0}}
               for p, s, (w, lo, t) in zip(prompts, scores, wins)]
    (run_dir / "round_2" / "eval_samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    flat = [v for s in scores for v in s]
    won = sum(w + t / 2 for w, _, t in wins) / sum(w + lo + t for w, lo, t in wins)
    rows = [{"round": 1, "judge_score": 0.1, "prompts": 4},
            {"round": 2, "judge_score": 0.2, "prompts": 4, "eval_judge_score": sum(flat) / len(flat),
             "eval_judge_score_ci": [0.0, 1.0], "win_rate_vs_pi0": won, "win_rate_vs_pi0_ci": [0.1, 0.9],
             **({"gaming_alarm": alarm} if alarm else {})}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump({"name": name, "seed": seed, "rounds": 2,
                                                         "loss": {"beta": beta}, "output_dir": str(root)}))
    return run_dir


def noisy(mean, n, spread=0.1, samples=2):
    return [[float(v) for v in RNG.normal(mean, spread, size=samples)] for _ in range(n)]


def test_significant_and_paired_on_the_same_prompts(tmp_path):
    base = noisy(0.5, 40)
    better = [[v + 0.2 for v in s] for s in base]
    a = make_run(tmp_path, "a", better, [(2, 0, 0)] * 40)
    b = make_run(tmp_path, "b", base, [(1, 1, 0)] * 40)
    # c evaluated the same prompts in another order, with the same scores as b: no difference.
    order = list(range(40))[::-1]
    c = make_run(tmp_path, "c", [base[i] for i in order], [(1, 1, 0)] * 40,
                 prompts=[f"Question {i}?" for i in order])
    pairs = pairwise([load_run(p) for p in (a, b, c)])
    ab, ac, bc = pairs
    assert ab["paired"] and ab["prompts"] == [40, 40]
    assert ab["eval_judge_score"]["diff"] == pytest.approx(0.2)
    assert ab["eval_judge_score"]["significant"] and ab["eval_judge_score"]["ci"][0] > 0.15
    assert ab["win_rate_vs_pi0"]["diff"] == pytest.approx(0.5) and ab["win_rate_vs_pi0"]["significant"]
    assert bc["paired"] and bc["eval_judge_score"]["diff"] == pytest.approx(0.0, abs=1e-12)
    assert not bc["eval_judge_score"]["significant"] and bc["eval_judge_score"]["mde"] == pytest.approx(0.0)
    text, warnings = significance_section(pairs, 0.1)
    assert "| a | b | 40 paired | eval score | +0.200 [" in text and "| **yes** |" in text
    assert warnings == []


def test_different_prompts_are_compared_unpaired(tmp_path):
    a = make_run(tmp_path, "a", noisy(0.7, 30), [(1, 0, 0)] * 30)
    b = make_run(tmp_path, "b", noisy(0.5, 20), [(0, 1, 0)] * 20, prompts=[f"Other {i}?" for i in range(20)])
    (pair,) = pairwise([load_run(a), load_run(b)])
    assert not pair["paired"] and pair["prompts"] == [30, 20]
    assert pair["eval_judge_score"]["significant"]
    text, _ = significance_section([pair], 0.1)
    assert "| 30 vs 20 unpaired |" in text


def test_a_small_held_out_set_warns_it_cannot_detect_a_tenth(tmp_path):
    outcomes = [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 0)]
    a = make_run(tmp_path, "a", noisy(0.5, 4), outcomes)
    b = make_run(tmp_path, "b", noisy(0.5, 4), outcomes[::-1])
    (pair,) = pairwise([load_run(a), load_run(b)])
    mde = pair["win_rate_vs_pi0"]["mde"]
    assert mde > 0.1
    _, warnings = significance_section([pair], 0.1)
    assert warnings == [f"WARNING: the held-out set is too small to detect a 0.1 difference in win rate "
                        f"(smallest detectable {mde:.3f} at n=4 prompts); raise data.eval_prompts or "
                        "eval.samples_per_prompt"]
    markdown = compare([a, b], tmp_path / "out")
    assert warnings[0] in markdown and f"at n=4 held-out prompts: {mde:.3f}" in markdown
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["warnings"] == warnings


def test_arms_of_two_seeds_get_intervals_across_seeds_and_prompts(tmp_path):
    runs = [make_run(tmp_path, f"x_seed{s}", noisy(0.5 + 0.02 * s, 30), [(1, 0, 0)] * 30, seed=s)
            for s in (0, 1)]
    runs.append(make_run(tmp_path, "y_seed0", noisy(0.9, 30), [(0, 1, 0)] * 30, beta=0.5))
    loaded = [load_run(p) for p in runs]
    arms = arm_groups(loaded)
    assert [(a["label"], [r["name"] for r in a["runs"]]) for a in arms] == [
        ("x", ["x_seed0", "x_seed1"]), ("y", ["y_seed0"])]
    summary = arms_summary(arms)
    x = summary[0]["eval_judge_score"]
    assert x["seeds"] == 2 and x["mean"] == pytest.approx(np.mean([r["rows"][1]["eval_judge_score"]
                                                                   for r in loaded[:2]]))
    assert x["ci"][0] < x["mean"] < x["ci"][1]
    assert summary[0]["eval_judge_score_by_round"].keys() == {"2"}
    markdown = compare(runs, tmp_path / "out")
    assert "## Arms" in markdown and "| x | 2 | " in markdown and "| y | 1 | " in markdown
    (line,) = [ln for ln in markdown.splitlines() if ln.startswith("| x | y | eval score | ")]
    assert line.endswith("| **yes** |") and " | -0.3" in line or " | -0.4" in line  # arm difference
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [a["arm"] for a in saved["arms"]] == ["x", "y"] and saved["arm_differences"][0]["significant"]
    assert (tmp_path / "out" / "summary.md").read_text().startswith("## Arms")
    assert (tmp_path / "out" / "arms.png").stat().st_size > 1000


def test_arms_plot_has_error_bars_and_integer_rounds(tmp_path):
    import matplotlib.pyplot as plt

    runs = [load_run(make_run(tmp_path, f"x_seed{s}", noisy(0.5, 10), [(1, 0, 0)] * 10, seed=s)) for s in (0, 1)]
    fig = arms_figure(arms_summary(arm_groups(runs)))
    try:
        score, win = fig.axes
        assert len(score.containers) == 1 and score.containers[0].has_yerr  # an errorbar container
        assert all(float(t).is_integer() for t in score.get_xticks())
        assert score.get_xlabel() == "round"
        assert [t.get_text() for t in win.get_legend().get_texts()] == ["x (n=2)"]
    finally:
        plt.close(fig)


def test_compare_reports_gaming_alarms_per_run(tmp_path):
    alarm = {"round": 2, "reasons": ["win rate against pi_0 below 0.5"], "judge_score_rise_since_round_1": 0.4,
             "judge_score_rise_ci": [0.2, 0.6], "win_rate_vs_pi0": 0.2, "win_rate_vs_pi0_ci": [0.1, 0.35]}
    a = make_run(tmp_path, "a", noisy(0.5, 5), [(0, 1, 0)] * 5, alarm=alarm)
    b = make_run(tmp_path, "b", noisy(0.5, 5), [(1, 0, 0)] * 5)
    markdown = compare([a, b], tmp_path / "out")
    assert "- WARNING: gaming alarm in a (see Gaming alarms)" in markdown
    section = markdown.split("## Gaming alarms\n", 1)[1].split("\n## ", 1)[0]
    assert section.strip().startswith("- a: WARNING: gaming alarm at round 2: training judge score rose +0.400")
    assert "b:" not in section
