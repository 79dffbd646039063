"""Tiny runs (transformers backend, seconds) record intervals every evaluated round, and `compare`
on two seeds marks significance, the smallest detectable difference and their arm."""

import json
import re

import pytest

from online_dpo.analysis.compare_command import compare
from online_dpo.config.recipe import recipe_from_dict
from online_dpo.pipeline.run import Run
from tests.conftest import tiny_recipe_dict


def is_ci(ci, value=None):
    ok = isinstance(ci, list) and len(ci) == 2 and ci[0] <= ci[1]
    return ok and (value is None or ci[0] - 1e-9 <= value <= ci[1] + 1e-9)


@pytest.fixture
def two_seeds(tiny_model_dir, prompts_file, tmp_path, capsys):
    """Two seeds of one arm, each with what it printed."""
    runs = []
    for seed in (0, 1):
        data = tiny_recipe_dict(tiny_model_dir, prompts_file, tmp_path / "runs", name=f"tiny_seed{seed}",
                                seed=seed, **{"data.eval_prompts": 3})
        run = Run(recipe_from_dict(data))
        runs.append((run, run.execute(), capsys.readouterr().out))
    return runs


def test_every_evaluated_round_records_intervals(two_seeds):
    run, rows, printed = two_seeds[0]
    pi0 = json.loads((run.dir / "round_0" / "pi0_eval.json").read_text())
    assert is_ci(pi0["judge_score_ci"], pi0["judge_score"])
    pi0_samples = [json.loads(x) for x in (run.dir / "round_0" / "pi0_eval_samples.jsonl").read_text().splitlines()]
    assert len(pi0_samples) == 3 and all("eval_score" in s for r in pi0_samples for s in r["samples"])
    for k, row in zip((1, 2), rows):
        summary = json.loads((run.dir / f"round_{k}" / "eval.json").read_text())
        assert is_ci(summary["eval_judge_score_ci"], summary["eval_judge_score"])
        assert is_ci(summary["win_rate_vs_pi0_ci"], summary["win_rate_vs_pi0"])
        judged = summary["wins_vs_pi0"] + summary["losses_vs_pi0"] + summary["ties_vs_pi0"]
        assert judged + summary["win_failed_vs_pi0"] == 3 * 2  # 3 prompts x 2 samples
        records = [json.loads(x) for x in (run.dir / f"round_{k}" / "eval_samples.jsonl").read_text().splitlines()]
        assert sum(r["vs_pi0"]["wins"] for r in records) == summary["wins_vs_pi0"]
        assert all(isinstance(s["eval_score"], float) for r in records for s in r["samples"])
        metrics = json.loads((run.dir / f"round_{k}" / "metrics.json").read_text())
        assert metrics == row
        assert is_ci(metrics["judge_score_ci"], metrics["judge_score"])
        assert is_ci(metrics["eval_judge_score_ci"]) and is_ci(metrics["win_rate_vs_pi0_ci"])
        assert is_ci(metrics["eval_score_vs_pi0_ci"], metrics["eval_score_vs_pi0"])
        assert ("gaming_alarm" in metrics) == (metrics.get("gaming_alarm") is not None)
    assert re.search(r"\| \d\.\d{3} \[\d\.\d\d, \d\.\d\d\] \|", (run.dir / "metrics.md").read_text())
    assert re.search(r"\[online-dpo\] round 2: .*eval_score=\d\.\d\d \[\d\.\d\d, \d\.\d\d\], "
                     r"win_rate_vs_pi0=\d\.\d\d \[\d\.\d\d, \d\.\d\d\]", printed)


def test_compare_two_seeds_marks_significance_mde_and_their_arm(two_seeds, tmp_path):
    (a, *_), (b, *_) = two_seeds
    markdown = compare([a.dir, b.dir], tmp_path / "cmp")
    summary = json.loads((tmp_path / "cmp" / "summary.json").read_text())
    (pair,) = summary["differences"]
    assert pair["paired"] and pair["prompts"] == [3, 3] and pair["rounds"] == [2, 2]  # same held-out prompts
    for key in ("eval_judge_score", "win_rate_vs_pi0"):
        d = pair[key]
        assert is_ci(d["ci"], d["diff"]) and d["significant"] == (d["ci"][0] > 0 or d["ci"][1] < 0)
        assert d["mde"] is None or d["mde"] >= 0
    rows = [ln for ln in markdown.splitlines() if ln.startswith("| tiny_seed0 | tiny_seed1 | 3 paired |")]
    assert len(rows) == 2 and all(" | no | " in ln or " | **yes** | " in ln for ln in rows)
    mde = pair["win_rate_vs_pi0"]["mde"]
    if mde is not None and mde > 0.1:  # 3 prompts rarely resolve a 0.1 difference
        assert "WARNING: the held-out set is too small to detect a 0.1 difference in win rate" in markdown
    (arm,) = summary["arms"]
    assert arm["arm"] == "tiny" and arm["runs"] == ["tiny_seed0", "tiny_seed1"] and arm["seeds"] == [0, 1]
    assert is_ci(arm["eval_judge_score"]["ci"], arm["eval_judge_score"]["mean"])
    assert set(arm["win_rate_vs_pi0_by_round"]) == {"1", "2"}
    assert "| tiny | 2 | " in markdown
    assert (tmp_path / "cmp" / "arms.png").stat().st_size > 1000


def test_eval_command_reports_intervals_and_paired_difference(two_seeds):
    from online_dpo.analysis.eval_command import evaluate, to_markdown

    (a, *_), (b, *_) = two_seeds
    result = evaluate(a.dir, None, ["pi0", str(b.dir)], None, None, 2)
    assert is_ci(result["policy"]["judge_score_ci"], result["policy"]["judge_score"])
    for r in result["against"].values():
        assert is_ci(r["win_rate_ci"], r["win_rate"]) and is_ci(r["judge_score_ci"], r["judge_score"])
        assert is_ci(r["score_diff_ci"], r["score_diff"])
        assert r["score_diff"] == pytest.approx(result["policy"]["judge_score"] - r["judge_score"])
        assert len(r["per_prompt"]) == 3
        assert r["win_rate_mde"] is None or r["win_rate_mde"] >= 0
    text = to_markdown(result)
    assert re.search(r"judge score \d\.\d{3} \[\d\.\d\d, \d\.\d\d\]", text)
    assert re.search(r"\| pi0 \| \d\.\d{3} \[\d\.\d\d, \d\.\d\d\] \|", text)
    assert "MDE: the smallest difference" in text
