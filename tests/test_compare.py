"""`online-dpo compare` on synthetic run directories: tables, budget warnings, plots, CLI errors."""

import json

import pytest
import yaml

from online_dpo.analysis.compare_command import (
    budget_warnings,
    budgets,
    compare,
    comparison_figures,
    load_run,
    main,
    markdown_tables,
    plot_comparison,
)


def make_run(root, name, rows, prompts_per_round=8, recipe=True):
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if recipe:
        (run_dir / "recipe.yaml").write_text(yaml.safe_dump(
            {"name": name, "rounds": len(rows), "data": {"prompts_per_round": prompts_per_round},
             "train": {"learning_rate": 2e-5}}))
    return run_dir


def row(k, win, score, kl, length, pairs=16, **extra):
    return {"round": k, "win_rate_vs_pi0": win, "eval_judge_score": score, "kl_to_pi0": kl,
            "eval_mean_length": length, "mean_length": length + 3, "judge_score": score - 0.1,
            "prompts": 8, "train_pairs": pairs, "optimizer_steps": 2, "sampled_tokens": 1000,
            **extra}


@pytest.fixture
def runs_root(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "alpha", [row(1, 0.55, 1.2, 0.8, 40.0), row(2, 0.625, 1.5, 1.75, 35.5),
                             row(3, 0.7, 1.84, 2.5, 30.25)])
    make_run(root, "beta", [row(1, 0.5, 1.1, 0.5, 50.0), row(2, 0.6, 1.3, 1.0, 48.0),
                            row(3, 0.65, 1.45, 1.5, 47.0)])
    # Trains twice the pairs, and its last round lacks win rate and eval length.
    gamma = [row(1, 0.52, 1.0, 0.4, 60.0, pairs=32), row(2, 0.58, 1.2, 0.9, 58.0, pairs=32)]
    gamma.append({k: v for k, v in row(3, None, 1.4, 1.2, 0, pairs=32).items()
                  if k not in ("win_rate_vs_pi0", "eval_mean_length")})
    make_run(root, "gamma", gamma)
    return root


def table_rows(markdown, title):
    """The body rows of the markdown table under `## title`, as lists of cells."""
    section = markdown.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return header, [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]


def test_load_run_and_budgets(runs_root):
    run = load_run(runs_root / "alpha")
    assert run["name"] == "alpha" and len(run["rows"]) == 3
    assert run["recipe"]["data"]["prompts_per_round"] == 8
    assert budgets(run) == {"prompts": 24, "train_pairs": 48, "optimizer_steps": 6,
                            "sampled_tokens": 3000, "rounds": 3}


def test_budgets_count_missing_keys_as_zero_and_take_prompts_from_recipe(tmp_path):
    run = load_run(make_run(tmp_path, "old", [{"round": 1, "train_pairs": 10}, {"round": 2}],
                            prompts_per_round=16))
    assert budgets(run) == {"prompts": 32, "train_pairs": 10, "optimizer_steps": 0,
                            "sampled_tokens": 0, "rounds": 2}
    bare = load_run(make_run(tmp_path, "bare", [{"round": 1}], recipe=False))
    assert bare["recipe"] == {}
    assert budgets(bare)["prompts"] == 0


def test_final_table_has_names_and_final_values(runs_root):
    runs = [load_run(runs_root / n) for n in ("alpha", "beta")]
    header, body = table_rows(markdown_tables(runs), "Final metrics")
    assert header[:2] == ["run", "rounds"]
    assert body[0][:6] == ["alpha", "3", "0.700", "1.840", "2.500", "30.250"]
    assert body[1][:6] == ["beta", "3", "0.650", "1.450", "1.500", "47.000"]
    assert body[0][6:] == ["24", "48", "6", "3000"]


def test_per_round_table_and_missing_values(runs_root):
    runs = [load_run(runs_root / n) for n in ("alpha", "gamma")]
    markdown = markdown_tables(runs)
    header, body = table_rows(markdown, "Per round")
    assert header == ["round", "alpha win", "alpha score", "alpha KL", "alpha len",
                      "gamma win", "gamma score", "gamma KL", "gamma len"]
    assert [r[0] for r in body] == ["1", "2", "3"]
    assert body[1] == ["2", "0.625", "1.500", "1.750", "35.500", "0.580", "1.200", "0.900",
                       "58.000"]
    assert body[2][5:] == ["-", "1.400", "1.200", "-"]
    _, final = table_rows(markdown, "Final metrics")
    assert final[1][:6] == ["gamma", "3", "-", "1.400", "1.200", "-"]


def test_per_round_table_aligns_runs_of_different_length(tmp_path):
    a = load_run(make_run(tmp_path, "a", [row(1, 0.5, 1.0, 0.1, 10.0), row(2, 0.6, 1.1, 0.2, 9.0)]))
    b = load_run(make_run(tmp_path, "b", [row(1, 0.4, 0.9, 0.3, 12.0)]))
    _, body = table_rows(markdown_tables([a, b]), "Per round")
    assert body[1] == ["2", "0.600", "1.100", "0.200", "9.000", "-", "-", "-", "-"]


def test_budget_warnings_only_when_budgets_differ(runs_root):
    alpha, beta, gamma = (load_run(runs_root / n) for n in ("alpha", "beta", "gamma"))
    assert budget_warnings([alpha, beta]) == []
    assert budget_warnings([alpha, gamma]) == [
        "WARNING: budgets differ in train_pairs: alpha=48, gamma=96"]


def test_budget_warnings_name_every_differing_key(tmp_path):
    a = load_run(make_run(tmp_path, "a", [row(1, 0.5, 1.0, 0.1, 10.0)]))
    b = load_run(make_run(tmp_path, "b", [row(1, 0.5, 1.0, 0.1, 10.0, pairs=8,
                                              sampled_tokens=500)]))
    assert budget_warnings([a, b]) == [
        "WARNING: budgets differ in train_pairs: a=16, b=8",
        "WARNING: budgets differ in sampled_tokens: a=1000, b=500",
    ]


@pytest.fixture
def figures():
    """comparison_figures as a dict {filename: Axes}; every figure is closed after the test."""
    import matplotlib.pyplot as plt

    opened = []

    def draw(runs):
        figs = dict(comparison_figures(runs))
        opened.extend(figs.values())
        assert all(len(f.axes) == 1 for f in figs.values())
        return {name: f.axes[0] for name, f in figs.items()}

    yield draw
    for fig in opened:
        plt.close(fig)


def run_lines(ax):
    """(label, xs, ys, colour) of each run's line; helper lines (labels starting '_') left out."""
    return [(ln.get_label(), list(ln.get_xdata()), list(ln.get_ydata()), ln.get_color())
            for ln in ax.get_lines() if not ln.get_label().startswith("_")]


def integer_ticks(ax):
    ticks = list(ax.get_xticks())
    return ticks and all(float(t).is_integer() for t in ticks)


def test_plots_draw_every_runs_series_with_labels(runs_root, figures):
    axes = figures([load_run(runs_root / n) for n in ("alpha", "beta", "gamma")])
    assert list(axes) == ["win_rate.png", "frontier.png", "length.png"]
    win, frontier, length = axes.values()

    assert run_lines(win) == [("alpha", [1, 2, 3], [0.55, 0.625, 0.7], "C0"),
                              ("beta", [1, 2, 3], [0.5, 0.6, 0.65], "C1"),
                              ("gamma", [1, 2], [0.52, 0.58], "C2")]  # round 3: no win rate
    chance = [ln for ln in win.get_lines() if ln.get_label().startswith("_")]
    assert len(chance) == 1 and list(chance[0].get_ydata()) == [0.5, 0.5]
    assert chance[0].get_linestyle() == "--"
    assert (win.get_xlabel(), win.get_ylabel()) == ("round", "win rate vs π0 (ties = ½)")

    assert run_lines(frontier) == [("alpha", [0.8, 1.75, 2.5], [1.2, 1.5, 1.84], "C0"),
                                   ("beta", [0.5, 1.0, 1.5], [1.1, 1.3, 1.45], "C1"),
                                   ("gamma", [0.4, 0.9, 1.2], [1.0, 1.2, 1.4], "C2")]
    # Each frontier point is annotated with its round.
    assert [(t.get_text(), t.xy) for t in frontier.texts][:3] == [
        ("1", (0.8, 1.2)), ("2", (1.75, 1.5)), ("3", (2.5, 1.84))]
    assert [t.get_text() for t in frontier.texts] == ["1", "2", "3"] * 3
    assert (frontier.get_xlabel(), frontier.get_ylabel()) == ("KL to π0 (nats)",
                                                              "held-out judge score")

    # Eval length where logged; gamma's round 3 falls back to mean_length (0 + 3).
    assert run_lines(length) == [("alpha", [1, 2, 3], [40.0, 35.5, 30.25], "C0"),
                                 ("beta", [1, 2, 3], [50.0, 48.0, 47.0], "C1"),
                                 ("gamma", [1, 2, 3], [60.0, 58.0, 3], "C2")]
    assert (length.get_xlabel(), length.get_ylabel()) == ("round", "mean length (tokens)")

    for ax in (win, length):  # rounds are whole numbers: no 1.5 on the round axis
        assert integer_ticks(ax) and {1, 2, 3} <= set(ax.get_xticks())
    for ax in axes.values():
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["alpha", "beta", "gamma"]


def test_a_run_without_a_metric_keeps_the_others_colours(tmp_path, figures):
    no_win = load_run(make_run(tmp_path, "no_win", [
        {k: v for k, v in row(1, None, 1.0, 0.1, 10.0).items() if k != "win_rate_vs_pi0"}]))
    other = load_run(make_run(tmp_path, "other", [row(1, 0.5, 1.0, 0.2, 12.0)]))
    win, frontier, _ = figures([no_win, other]).values()
    assert run_lines(win) == [("other", [1], [0.5], "C1")]
    assert [c for *_, c in run_lines(frontier)] == ["C0", "C1"]


def test_plot_files_are_those_figures(runs_root, tmp_path):
    import io

    import matplotlib.pyplot as plt

    runs = [load_run(runs_root / n) for n in ("alpha", "beta", "gamma")]
    out = tmp_path / "plots"
    paths = plot_comparison(runs, out)
    assert paths == [out / "win_rate.png", out / "frontier.png", out / "length.png"]
    assert sorted(f.name for f in out.iterdir()) == ["frontier.png", "length.png", "win_rate.png"]
    for path, (name, fig) in zip(paths, comparison_figures(runs), strict=True):
        buf = io.BytesIO()
        fig.savefig(buf, dpi=100, format="png")
        plt.close(fig)
        assert path.name == name and path.read_bytes() == buf.getvalue()


def test_compare_writes_markdown_with_warnings_first(runs_root, tmp_path):
    out = tmp_path / "cmp"
    markdown = compare([runs_root / "alpha", runs_root / "gamma"], out)
    assert (out / "compare.md").read_text() == markdown
    warning = markdown.index("WARNING: budgets differ in train_pairs: alpha=48, gamma=96")
    assert warning < markdown.index("## Final metrics") < markdown.index("## Per round")
    for name in ("win_rate.png", "frontier.png", "length.png"):
        assert f"({name})" in markdown
        assert (out / name).stat().st_size > 1000


def test_compare_rejects_the_same_run_twice(runs_root, tmp_path):
    with pytest.raises(ValueError, match="at least two"):
        compare([runs_root / "alpha", runs_root / "alpha" / ".." / "alpha"], tmp_path / "o")


def test_main_ok(runs_root, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(runs_root / "alpha"), str(runs_root / "beta"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| alpha | 3 | 0.700 |" in printed and "| beta | 3 | 0.650 |" in printed
    assert "WARNING" not in printed
    assert "| alpha | 3 | 0.700 |" in (out / "compare.md").read_text()


def test_main_error_for_directory_without_metrics(runs_root, tmp_path, capsys):
    empty = runs_root / "unfinished"
    empty.mkdir()
    assert main([str(runs_root / "alpha"), str(empty), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("online-dpo compare: error: ")
    assert f"{empty}: no metrics.jsonl" in err
    assert not (tmp_path / "o" / "compare.md").exists()


def test_main_error_for_empty_metrics_and_missing_dir(runs_root, tmp_path, capsys):
    blank = runs_root / "blank"
    blank.mkdir()
    (blank / "metrics.jsonl").write_text("\n")
    assert main([str(runs_root / "alpha"), str(blank), "--out", str(tmp_path / "o")]) == 2
    assert f"{blank}: empty metrics.jsonl" in capsys.readouterr().err
    missing = runs_root / "nope"
    assert main([str(runs_root / "alpha"), str(missing), "--out", str(tmp_path / "o")]) == 2
    assert f"{missing}: not a run directory" in capsys.readouterr().err


def test_main_error_for_a_single_run(runs_root, tmp_path, capsys):
    assert main([str(runs_root / "alpha"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "online-dpo compare: error: need at least two distinct run directories" in err
