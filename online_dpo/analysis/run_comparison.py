"""What `online-dpo compare` says about uncertainty: which differences between runs are significant,
the smallest difference the held-out set can detect, gaming alarms, and arms (runs that differ
only in their seed) with intervals across seeds and prompts.

Per-prompt held-out values come from each evaluated round's eval_samples.jsonl (online_dpo/analysis/
round_uncertainty.py). Two runs are compared on their last evaluated round: paired over the held-out prompts
when both evaluated the same prompts (checked prompt by prompt), else unpaired. Runs written before
per-prompt values were recorded get no significance, only their values.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from online_dpo.analysis.round_uncertainty import (
    alarm_message,
    eval_score_groups,
    prompt_keys,
    win_groups,
)
from online_dpo.analysis.statistics import (
    min_detectable_difference,
    paired_bootstrap_diff,
    two_level_bootstrap,
    two_level_diff,
    unpaired_bootstrap_diff,
)
from online_dpo.storage.artifacts import read_jsonl

METRICS = (("eval_judge_score", "eval score", "scores"), ("win_rate_vs_pi0", "win vs π0", "wins"))
NOT_IN_ARM = ("name", "seed", "output_dir")


def held_out(run: dict) -> dict[int, dict]:
    """{round: {"keys", "scores", "wins"}} for every round with per-prompt held-out values."""
    if "held_out" not in run:
        found = {}
        for row in run["rows"]:
            path = Path(run["path"]) / f"round_{row['round']}" / "eval_samples.jsonl"
            if row.get("eval_judge_score") is None or not path.is_file():
                continue
            records = read_jsonl(path)
            values = {"keys": prompt_keys(records), "scores": eval_score_groups(records),
                      "wins": win_groups(records)}
            if values["scores"] is not None or values["wins"] is not None:
                found[row["round"]] = values
        run["held_out"] = found
    return run["held_out"]


def final_held_out(run: dict) -> tuple[int, dict] | None:
    rounds = held_out(run)
    return (max(rounds), rounds[max(rounds)]) if rounds else None


def _align(a: dict, b: dict) -> tuple[bool, dict]:
    """Whether a and b answered the same held-out prompts; if so b's values in a's prompt order."""
    keys_a, keys_b = a["keys"], b["keys"]
    if len(set(keys_a)) != len(keys_a) or sorted(keys_a) != sorted(keys_b):
        return False, b
    where = {key: i for i, key in enumerate(keys_b)}
    order = [where[key] for key in keys_a]
    return True, {name: None if b[name] is None else [b[name][i] for i in order] for name in ("scores", "wins")}


def difference(a: list, b: list, paired: bool) -> dict | None:
    """a's mean minus b's with its interval, significance and the smallest detectable difference."""
    diff = paired_bootstrap_diff(a, b) if paired else unpaired_bootstrap_diff(a, b)
    if diff is None:
        return None
    return {"diff": diff.value, "ci": diff.ci, "significant": diff.excludes(0),
            "mde": min_detectable_difference(a, b, paired=paired)}


def pairwise(runs: list[dict]) -> list[dict]:
    """Every pair of runs with per-prompt values: differences of their final held-out metrics."""
    out = []
    for i, run_a in enumerate(runs):
        for run_b in runs[i + 1:]:
            fa, fb = final_held_out(run_a), final_held_out(run_b)
            if fa is None or fb is None:
                continue
            paired, b = _align(fa[1], fb[1])
            entry = {"a": run_a["name"], "b": run_b["name"], "rounds": [fa[0], fb[0]], "paired": paired,
                     "prompts": [len(fa[1]["keys"]), len(fb[1]["keys"])]}
            for key, _, field in METRICS:
                if fa[1][field] is not None and b[field] is not None:
                    entry[key] = difference(fa[1][field], b[field], paired)
            out.append(entry)
    return out


def _iv(value, ci, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" + (f" [{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]" if ci else "")


def significance_section(pairs: list[dict], detect: float) -> tuple[str, list[str]]:
    """The markdown of the pairwise differences, and the warnings (MDE above `detect`)."""
    if not pairs:
        return ("## Differences between runs\n\nNo per-prompt held-out values in at least two runs "
                "(runs from before they were recorded): significance not computed.\n"), []
    header = ["a", "b", "held-out prompts", "metric", "a − b [95% CI]", "significant", "detectable (MDE)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] * 4 + ["---:"] * 3) + "|"]
    worst = None
    for p in pairs:
        n = f"{p['prompts'][0]} paired" if p["paired"] else f"{p['prompts'][0]} vs {p['prompts'][1]} unpaired"
        for key, title, _ in METRICS:
            d = p.get(key)
            if d is None:
                continue
            mde = "-" if d["mde"] is None else f"{d['mde']:.3f}"
            lines.append(f"| {p['a']} | {p['b']} | {n} | {title} | {_iv(d['diff'], d['ci'])} | "
                         f"{'**yes**' if d['significant'] else 'no'} | {mde} |")
            if key == "win_rate_vs_pi0" and d["mde"] is not None and (worst is None or d["mde"] > worst[0]):
                worst = (d["mde"], min(p["prompts"]))
    text = ("## Differences between runs\n\nFinal evaluated round of each run; paired bootstrap over "
            "the shared held-out prompts when both runs evaluated the same ones, else unpaired. "
            "Significant: the 95% interval excludes 0. MDE: the smallest true difference detected with "
            "power 0.8 at alpha 0.05, (z_0.975 + z_0.8) × SE from the per-prompt variance.\n\n"
            + "\n".join(lines) + "\n")
    warnings = []
    if worst is not None:
        text += (f"\nSmallest detectable difference in win rate at n={worst[1]} held-out prompts: "
                 f"{worst[0]:.3f}.\n")
        if worst[0] > detect:
            warnings.append(f"WARNING: the held-out set is too small to detect a {detect:g} difference in "
                            f"win rate (smallest detectable {worst[0]:.3f} at n={worst[1]} prompts); "
                            "raise data.eval_prompts or eval.samples_per_prompt")
    return text, warnings


def alarms_section(runs: list[dict]) -> str:
    lines = [f"- {run['name']}: {alarm_message(row['gaming_alarm'])}"
             for run in runs for row in run["rows"] if row.get("gaming_alarm")]
    return "## Gaming alarms\n\n" + ("\n".join(lines) if lines else "None in any run.") + "\n"


# ---------------------------------------------------------------------------- arms


def arm_groups(runs: list[dict]) -> list[dict]:
    """Runs grouped by arm (their recipe but name, seed and output_dir), first-seen order."""
    try:
        from online_dpo.analysis.sweep import arm_of
    except ImportError:  # pragma: no cover - sweeps ship with this module
        arm_of = None
    arms: dict[str, dict] = {}
    for run in runs:
        if not run["recipe"]:
            key, label = f"run:{run['path']}", run["name"]
        elif arm_of is not None:
            key, label = arm_of(run["path"])
        else:
            kept = {k: v for k, v in run["recipe"].items() if k not in NOT_IN_ARM}
            key = hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]
            label = run["name"]
        arms.setdefault(key, {"key": key, "label": label, "runs": []})["runs"].append(run)
    labels = [a["label"] for a in arms.values()]
    for arm in arms.values():  # different arms, one label: tell them apart
        if labels.count(arm["label"]) > 1:
            arm["label"] = f"{arm['label']} ({arm['key'][-6:]})"
    return list(arms.values())


def arm_value(arm: dict, key: str, field: str, k: int | None = None) -> dict | None:
    """An arm's metric at round k (default: each seed's final evaluated round): the mean across
    seeds, with a two-level bootstrap interval when every seed has per-prompt values."""
    values, groups = [], []
    for run in arm["runs"]:
        rows = {r["round"]: r for r in run["rows"] if r.get(key) is not None}
        at = k if k is not None else (max(rows) if rows else None)
        if at not in rows:
            return None
        values.append(rows[at][key])
        per_prompt = held_out(run).get(at, {}).get(field)
        groups.append(per_prompt)
    interval = two_level_bootstrap(groups) if all(g is not None for g in groups) else None
    return {"mean": sum(values) / len(values), "ci": interval.ci if interval else None, "seeds": len(values),
            "groups": groups if interval else None}


def arms_summary(arms: list[dict]) -> list[dict]:
    """Per arm: seeds, runs, and each metric's final and per-round mean ± interval."""
    summary = []
    for arm in arms:
        rounds = sorted({r["round"] for run in arm["runs"] for r in run["rows"]})
        entry = {"arm": arm["label"], "key": arm["key"], "runs": [run["name"] for run in arm["runs"]],
                 "seeds": [run["recipe"].get("seed") for run in arm["runs"]]}
        for key, _, field in METRICS:
            final = arm_value(arm, key, field)
            entry[key] = final and {k: v for k, v in final.items() if k != "groups"}
            per_round = {k: arm_value(arm, key, field, k) for k in rounds}
            entry[f"{key}_by_round"] = {str(k): {x: v for x, v in val.items() if x != "groups"}
                                        for k, val in per_round.items() if val is not None}
        summary.append(entry)
    return summary


def arm_differences(arms: list[dict]) -> list[dict]:
    """Each pair of arms: the difference of their final means, seeds then prompts resampled."""
    out = []
    for i, a in enumerate(arms):
        for b in arms[i + 1:]:
            for key, _, field in METRICS:
                va, vb = arm_value(a, key, field), arm_value(b, key, field)
                diff = two_level_diff(va["groups"], vb["groups"]) if va and vb and va["groups"] and vb["groups"] else None
                if diff is not None:
                    out.append({"a": a["label"], "b": b["label"], "metric": key, "diff": diff.value,
                                "ci": diff.ci, "significant": diff.excludes(0)})
    return out


def arms_markdown(summary: list[dict], diffs: list[dict]) -> str:
    header = ["arm", "seeds", *(f"{title} (mean [95% CI])" for _, title, _ in METRICS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---", "---:"] + ["---:"] * len(METRICS)) + "|"]
    for entry in summary:
        cells = []
        for key, _, _ in METRICS:
            v = entry[key]
            cells.append("-" if v is None else f"{v['mean']:.3f}"
                         + (f" [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}]" if v["ci"] else ""))
        lines.append(f"| {entry['arm']} | {len(entry['runs'])} | " + " | ".join(cells) + " |")
    text = ("## Arms\n\nRuns whose recipes differ only in seed, name and output_dir form an arm. Each "
            "seed's final evaluated round; the interval resamples seeds, then prompts within each seed "
            "(two-level bootstrap).\n\n" + "\n".join(lines) + "\n")
    if diffs:
        titles = {key: title for key, title, _ in METRICS}
        text += "\n| arm a | arm b | metric | a − b [95% CI] | significant |\n|:---|:---|:---|---:|---:|\n"
        text += "\n".join(f"| {d['a']} | {d['b']} | {titles[d['metric']]} | {_iv(d['diff'], d['ci'])} | "
                          f"{'**yes**' if d['significant'] else 'no'} |" for d in diffs) + "\n"
    return text


def arms_figure(summary: list[dict]):
    """Per round, each arm's mean held-out score and win rate with 95% error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from online_dpo.analysis.round_report import integer_rounds

    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 3.8))
    for ax, (key, title, _) in zip(axes, METRICS):
        for i, entry in enumerate(summary):
            points = sorted((int(k), v) for k, v in entry[f"{key}_by_round"].items())
            if not points:
                continue
            xs = [k for k, _ in points]
            ys = [v["mean"] for _, v in points]
            err = [[max(v["mean"] - v["ci"][0], 0) if v["ci"] else 0 for _, v in points],
                   [max(v["ci"][1] - v["mean"], 0) if v["ci"] else 0 for _, v in points]]
            ax.errorbar(xs, ys, yerr=err, fmt="o-", capsize=3, color=f"C{i % 10}",
                        label=f"{entry['arm']} (n={len(entry['runs'])})")
        if key == "win_rate_vs_pi0":
            ax.axhline(0.5, color="gray", linestyle="--", linewidth=1)
        integer_rounds(ax, [int(k) for entry in summary for k in entry[f"{key}_by_round"]])
        ax.set_xlabel("round")
        ax.set_ylabel(title + " (mean across seeds, 95% CI)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig

