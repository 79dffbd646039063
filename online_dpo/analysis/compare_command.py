"""`online-dpo compare runs/A runs/B --out DIR`: side-by-side tables and plots for finished runs.

Every win rate and mean score carries its 95% interval where the run recorded one; which
differences are significant, the smallest detectable difference, gaming alarms and arms (runs
differing only in seed) come from online_dpo/analysis/run_comparison.py. Writes compare.md, summary.md,
summary.json and the plots into --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from online_dpo.analysis.round_report import integer_rounds
from online_dpo.analysis.run_comparison import (
    alarms_section,
    arm_differences,
    arm_groups,
    arms_figure,
    arms_markdown,
    arms_summary,
    pairwise,
    significance_section,
)
from online_dpo.storage.artifacts import write_json, write_text_atomic

BUDGET_KEYS = ("prompts", "train_pairs", "optimizer_steps", "sampled_tokens")
FINAL_COLUMNS = [
    ("win_rate_vs_pi0", "win vs π0"),
    ("eval_judge_score", "eval score"),
    ("kl_to_pi0", "KL(π0)"),
    ("eval_mean_length", "eval len"),
]
ROUND_COLUMNS = [
    ("win_rate_vs_pi0", "win"),
    ("eval_judge_score", "score"),
    ("kl_to_pi0", "KL"),
    ("eval_mean_length", "len"),
]


def load_run(path) -> dict:
    """Read a run directory's metrics.jsonl (required) and recipe.yaml (optional)."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path}: not a run directory")
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise ValueError(f"{path}: no metrics.jsonl — has the run finished a round?")
    try:
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"{metrics}: bad JSON line: {e}") from e
    if not rows:
        raise ValueError(f"{path}: empty metrics.jsonl — has the run finished a round?")
    if not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{metrics}: every line must be a JSON object")
    for i, row in enumerate(rows, start=1):
        if row.get("round") is None:
            row["round"] = i
    recipe = {}
    recipe_path = path / "recipe.yaml"
    if recipe_path.is_file():
        try:
            recipe = yaml.safe_load(recipe_path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{recipe_path}: invalid YAML: {e}") from e
        if not isinstance(recipe, dict):
            raise ValueError(f"{recipe_path}: expected a mapping")
    return {"name": path.name or path.resolve().name, "path": path, "rows": rows, "recipe": recipe}


def budgets(run: dict) -> dict:
    """Totals over rounds of the budget keys (missing counts as 0), plus the number of rounds."""
    data = run["recipe"].get("data")
    per_round = data.get("prompts_per_round") if isinstance(data, dict) else None
    totals = {key: 0 for key in BUDGET_KEYS}
    for row in run["rows"]:
        for key in BUDGET_KEYS:
            value = row.get(key)
            # Older runs never logged `prompts`; the recipe says how many each round drew.
            if value is None and key == "prompts":
                value = per_round
            totals[key] += value or 0
    totals["rounds"] = len(run["rows"])
    return totals


def budget_warnings(runs: list[dict]) -> list[str]:
    """One warning per budget key whose totals are not the same in every run."""
    totals = [(run["name"], budgets(run)) for run in runs]
    lines = []
    for key in BUDGET_KEYS:
        if len({b[key] for _, b in totals}) > 1:
            values = ", ".join(f"{name}={_fmt_int(b[key])}" for name, b in totals)
            lines.append(f"WARNING: budgets differ in {key}: {values}")
    return lines


def _fmt(value, ci=None) -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
    return str(value)


def _fmt_int(value) -> str:
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.3f}"
    return str(int(value))


def _table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def markdown_tables(runs: list[dict]) -> str:
    """A final-metrics table (one row per run) and a per-round table (one column group per run)."""
    header = ["run", "rounds", *(title for _, title in FINAL_COLUMNS),
              *(key.replace("_", " ") for key in BUDGET_KEYS)]
    body = []
    for run in runs:
        last, totals = run["rows"][-1], budgets(run)
        body.append([run["name"], str(totals["rounds"]),
                     *(_fmt(last.get(key), last.get(f"{key}_ci")) for key, _ in FINAL_COLUMNS),
                     *(_fmt_int(totals[key]) for key in BUDGET_KEYS)])
    final = _table(header, body)

    by_round = [{row["round"]: row for row in run["rows"]} for run in runs]
    rounds = sorted(set().union(*by_round))
    header = ["round", *(f"{run['name']} {title}" for run in runs for _, title in ROUND_COLUMNS)]
    body = [[str(k), *(_fmt(rows.get(k, {}).get(key), rows.get(k, {}).get(f"{key}_ci")) for rows in by_round
                       for key, _ in ROUND_COLUMNS)]
            for k in rounds]
    per_round = _table(header, body)
    return f"## Final metrics\n\n{final}\n\n## Per round\n\n{per_round}\n"


def _points(rows: list[dict], x_key: str, y_keys: tuple[str, ...]) -> list[tuple]:
    """(x, y, round) for rows where x and the first non-None of `y_keys` exist."""
    points = []
    for row in rows:
        x = row.get(x_key)
        y = next((row.get(k) for k in y_keys if row.get(k) is not None), None)
        if x is not None and y is not None:
            points.append((x, y, row["round"]))
    return points


def _save(fig, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=100, format="png")
    tmp.replace(path)


def comparison_figures(runs: list[dict]):
    """Yield (filename, matplotlib Figure) for win_rate.png, frontier.png and length.png, in
    that order. The caller owns each figure (save it, then `plt.close` it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = [
        ("win_rate.png", "round", ("win_rate_vs_pi0",), "round", "win rate vs π0 (ties = ½)"),
        ("frontier.png", "kl_to_pi0", ("eval_judge_score",), "KL to π0 (nats)",
         "held-out judge score"),
        ("length.png", "round", ("eval_mean_length", "mean_length"), "round",
         "mean length (tokens)"),
    ]
    for filename, x_key, y_keys, x_label, y_label in specs:
        fig, ax = plt.subplots(figsize=(6, 4))
        try:
            for i, run in enumerate(runs):
                points = _points(run["rows"], x_key, y_keys)
                if not points:
                    continue
                xs, ys, _ = zip(*points)
                # Fixed colour per run, so a run lacking one metric doesn't shift the others.
                ax.plot(xs, ys, "o-", label=run["name"], color=f"C{i % 10}")
                _draw_intervals(ax, run["rows"], x_key, y_keys[0], filename, f"C{i % 10}")
                if filename == "frontier.png":
                    for x, y, k in points:
                        ax.annotate(str(k), (x, y), textcoords="offset points", xytext=(4, 4),
                                    fontsize=8)
            if filename == "win_rate.png":
                ax.axhline(0.5, color="gray", linestyle="--", linewidth=1)
            if x_key == "round":
                integer_rounds(ax, [row["round"] for run in runs for row in run["rows"]])
            ax.set_xlabel(x_label)
            ax.set_ylabel(y_label)
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
            fig.tight_layout()
        except BaseException:
            plt.close(fig)
            raise
        yield filename, fig


def _draw_intervals(ax, rows: list[dict], x_key: str, key: str, filename: str, color: str) -> None:
    """95% intervals: a shaded band over rounds, vertical bars on the frontier (neither is a line)."""
    kept = [(row[x_key], *row[f"{key}_ci"]) for row in rows
            if row.get(x_key) is not None and row.get(key) is not None and row.get(f"{key}_ci")]
    if not kept:
        return
    xs, lo, hi = zip(*kept)
    if filename == "frontier.png":
        ax.vlines(xs, lo, hi, color=color, alpha=0.5)
    else:
        ax.fill_between(xs, lo, hi, color=color, alpha=0.15, linewidth=0)


def plot_comparison(runs: list[dict], out_dir) -> list[Path]:
    """Write win_rate.png, frontier.png and length.png into `out_dir`; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for filename, fig in comparison_figures(runs):
        try:
            _save(fig, out_dir / filename)
            paths.append(out_dir / filename)
        finally:
            plt.close(fig)
    return paths


def compare(paths, out_dir, detect: float = 0.1) -> str:
    """Load at least two runs, write plots, compare.md, summary.md and summary.json into `out_dir`,
    return the markdown. `detect`: warn when the held-out set cannot detect a win-rate difference
    this large."""
    # Keyed by the resolved path so `runs/A` and `./runs/A/` count once; messages keep the given one.
    unique: dict[Path, Path] = {}
    for p in paths:
        unique.setdefault(Path(p).resolve(), Path(p))
    if len(unique) < 2:
        raise ValueError("need at least two distinct run directories to compare")
    runs = [load_run(p) for p in unique.values()]
    names = [run["name"] for run in runs]
    if len(set(names)) < len(names):
        # Column titles are keyed by name, so same-named runs from different folders need paths.
        for run in runs:
            run["name"] = str(run["path"])
    out_dir = Path(out_dir)
    plots = plot_comparison(runs, out_dir)
    pairs = pairwise(runs)
    significance, mde_warnings = significance_section(pairs, detect)
    arms = arm_groups(runs)
    summary, arm_diffs = arms_summary(arms), arm_differences(arms)
    arms_text = arms_markdown(summary, arm_diffs)
    plots.append(_write_figure(arms_figure(summary), out_dir / "arms.png"))
    parts = ["# Run comparison\n"]
    warnings = budget_warnings(runs) + mde_warnings
    alarms = [run["name"] for run in runs if any(row.get("gaming_alarm") for row in run["rows"])]
    if alarms:
        warnings.append(f"WARNING: gaming alarm in {', '.join(alarms)} (see Gaming alarms)")
    if warnings:
        parts.append("\n".join(f"- {w}" for w in warnings) + "\n")
    parts += [markdown_tables(runs), significance, alarms_section(runs), arms_text]
    parts.append("## Plots\n\n" + "\n".join(f"- ![{p.stem}]({p.name})" for p in plots) + "\n")
    markdown = "\n".join(parts)
    write_text_atomic(out_dir / "summary.md", arms_text)
    write_json(out_dir / "summary.json", {
        "runs": [{"name": run["name"], "path": str(run["path"]), "final": _final(run),
                  "gaming_alarms": [row["gaming_alarm"] for row in run["rows"] if row.get("gaming_alarm")]}
                 for run in runs],
        "differences": pairs, "arms": summary, "arm_differences": arm_diffs, "warnings": warnings})
    write_text_atomic(out_dir / "compare.md", markdown)
    return markdown


def _final(run: dict) -> dict:
    last = run["rows"][-1]
    keys = [key for key, _ in FINAL_COLUMNS]
    return {"round": last["round"], **{k: last.get(k) for k in keys},
            **{f"{k}_ci": last.get(f"{k}_ci") for k in keys if last.get(f"{k}_ci")}}


def _write_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _save(fig, path)
    finally:
        plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="online-dpo compare", description=__doc__)
    parser.add_argument("runs", nargs="+", help="run directories, e.g. runs/A runs/B")
    parser.add_argument("--out", default="runs/compare", help="output folder (default: runs/compare)")
    parser.add_argument("--detect", type=float, default=0.1,
                        help="warn when the held-out set cannot detect a win-rate difference this large")
    args = parser.parse_args(argv)
    try:
        markdown = compare(args.runs, args.out, args.detect)
    except ValueError as e:
        print(f"online-dpo compare: error: {e}", file=sys.stderr)
        return 2
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
