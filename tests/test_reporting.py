"""A run's plot.png: what each panel draws, its labels, and that the file is that figure."""

import io

import pytest

from online_dpo.analysis.round_report import plot_run, run_figure

ROWS = [
    {"round": 1, "judge_score": 1.0, "eval_judge_score": 1.1, "kl_to_reference": 0.0},
    {"round": 2, "judge_score": 1.25, "eval_judge_score": None, "kl_to_reference": 0.05},  # not evaluated
    {"round": 3, "judge_score": 1.5, "eval_judge_score": 1.75, "kl_to_reference": 0.125},
]


@pytest.fixture
def figure():
    import matplotlib.pyplot as plt

    fig = run_figure(ROWS)
    yield fig
    plt.close(fig)


def lines(ax):
    return [(ln.get_label(), list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.get_lines()]


def test_run_plot_draws_scores_and_kl_per_round(figure):
    scores, kl = figure.axes
    assert lines(scores) == [("fresh samples", [1, 2, 3], [1.0, 1.25, 1.5]),
                             ("held-out (after update)", [1, 3], [1.1, 1.75])]  # round 2 left out
    assert [t.get_text() for t in scores.get_legend().get_texts()] == [
        "fresh samples", "held-out (after update)"]
    assert [(x, y) for _, x, y in lines(kl)] == [([1, 2, 3], [0.0, 0.05, 0.125])]
    assert (scores.get_xlabel(), scores.get_ylabel()) == ("round", "mean judge score")
    assert (kl.get_xlabel(), kl.get_ylabel()) == ("round", "KL to reference (nats)")
    for ax in (scores, kl):  # whole rounds only: no 1.5 on the round axis
        ticks = list(ax.get_xticks())
        assert all(float(t).is_integer() for t in ticks) and {1, 2, 3} <= set(ticks)


def test_offline_rounds_have_no_fresh_sample_points():
    import matplotlib.pyplot as plt

    fig = run_figure([{"round": k, "eval_judge_score": 0.5 * k, "kl_to_reference": 0.0}
                      for k in (1, 2)])
    try:
        fresh, held_out = lines(fig.axes[0])
        assert fresh == ("fresh samples", [], []) and held_out[1:] == ([1, 2], [0.5, 1.0])
    finally:
        plt.close(fig)


def test_plot_png_is_that_figure(figure, tmp_path):
    plot_run(ROWS, tmp_path / "plot.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]
    buf = io.BytesIO()
    figure.savefig(buf, dpi=100, format="png")
    assert (tmp_path / "plot.png").read_bytes() == buf.getvalue()
