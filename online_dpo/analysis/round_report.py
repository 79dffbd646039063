"""Per-round metrics from step summaries, the run's metrics.jsonl, a markdown table and a plot."""

from __future__ import annotations

import json
from pathlib import Path

from online_dpo.analysis.round_uncertainty import alarm_message, round_intervals
from online_dpo.storage.artifacts import read_json, read_jsonl, write_text_atomic

PHASES = ("sample", "judge", "pairs", "train", "sync", "eval", "reference")

TABLE_COLUMNS = [
    ("round", "round", "{}"),
    ("judge_score", "judge score", "{:.3f}"),
    ("eval_judge_score", "eval score", "{:.3f}"),
    ("loss", "loss", "{:.4f}"),
    ("accuracy", "pref. acc", "{:.2f}"),
    ("reward_margin", "margin", "{:.3f}"),
    ("kl_to_reference", "KL(ref)", "{:.3f}"),
    ("kl_to_pi0", "KL(π0)", "{:.3f}"),
    ("win_rate_vs_pi0", "win vs π0", "{:.2f}"),
    ("mean_length", "len", "{:.1f}"),
    ("eos_rate", "EOS", "{:.2f}"),
    ("pairs_kept", "kept", "{}"),
    ("pairs_dropped", "dropped", "{}"),
    ("sync_seconds", "sync s", "{:.2f}"),
    ("round_seconds", "round s", "{:.0f}"),
]


# A metric's 95% interval, [lo, hi], is stored under its own key (see online_dpo/analysis/statistics.py).
CI_KEYS = {"judge_score": "judge_score_ci", "eval_judge_score": "eval_judge_score_ci",
           "win_rate_vs_pi0": "win_rate_vs_pi0_ci"}


TIMING = ("seconds", "started_at")  # each step's own, in <step>.json; phase_seconds gathers the first


def round_metrics(round_dir: Path, k: int, run_dir: Path | None = None) -> dict:
    summaries = {p: read_json(round_dir / f"{p}.json") for p in PHASES if (round_dir / f"{p}.json").exists()}
    train, pairs = summaries["train"], summaries["pairs"]
    metrics = {"round": k, "reference_source_round": summaries["reference"]["source_round"],
               "pairs_kept": pairs["pairs"], "fresh_pairs": pairs.get("fresh_pairs"),
               "replayed_pairs": pairs.get("replayed_pairs", 0),
               # Policy updates between the sampling policy and the trained one (generation.max_staleness).
               "staleness": pairs.get("staleness")}
    if "sample" in summaries:  # online round: fresh samples and their judgments
        samples = [s for rec in read_jsonl(round_dir / "samples.jsonl") for s in rec["samples"]]
        judge = summaries["judge"]
        metrics.update({
            "judge_score": judge["judge_score"],
            "mean_length": sum(s["num_tokens"] for s in samples) / len(samples),
            "eos_rate": sum(s["finished"] for s in samples) / len(samples),
            "pairs_dropped": judge["pairs_tied"] + judge["pairs_failed"],
            "prompts": summaries["sample"]["prompts"],
            "generation_seconds": summaries["sample"]["generation_seconds"],
            "sampled_tokens": summaries["sample"]["sampled_tokens"],
            "tokens_per_second": summaries["sample"]["tokens_per_second"],
        })
        # Judge-layer statistics (flip rate, vote agreement, retries, cache hits, length preference).
        metrics.update({key: v for key, v in judge.items() if key not in metrics and key not in TIMING})
    else:  # offline: no fresh prompts; a one-time collection from pi_0 is charged to round 1
        metrics.update(prompts=0, sampled_tokens=0)
        collect = run_dir / "round_0" / "sample.json" if run_dir is not None else None
        if k == 1 and collect is not None and collect.exists():
            stats = read_json(collect)
            metrics.update(prompts=stats["prompts"], sampled_tokens=stats["sampled_tokens"])
    for key in ("loss", "accuracy", "chosen_reward", "rejected_reward", "reward_margin", "beta",
                "grad_norm", "optimizer_steps", "train_pairs", "train_examples", "reference_logps_from",
                "reference_cache_hits"):
        metrics[key] = train.get(key)
    rates = train.get("learning_rates")
    metrics["learning_rate"] = rates[-1] if rates else None  # the round's last step's (train.lr_scheduler)
    for key in ("sync_seconds", "probe_max_abs_diff"):
        metrics[key] = summaries["sync"].get(key)
    metrics.update({k2: v for k2, v in summaries["eval"].items() if k2 not in (*TIMING, "skipped")})
    # judge_score_ci, eval_score_vs_pi0(_ci), gaming_alarm: from the per-prompt values on disk.
    metrics.update(round_intervals(run_dir if run_dir is not None else round_dir.parent, k, metrics))
    metrics["phase_seconds"] = {p: s["seconds"] for p, s in summaries.items()}
    metrics["round_seconds"] = sum(metrics["phase_seconds"].values())
    return metrics


def finish_run(run_dir: Path, rounds: int) -> list[dict]:
    rows = [read_json(run_dir / f"round_{k}" / "metrics.json") for k in range(1, rounds + 1)
            if (run_dir / f"round_{k}" / "metrics.json").exists()]
    # Rebuilt from the per-round files rather than appended, so a crash between a round's
    # metrics.json and this file can never duplicate or lose a row.
    write_text_atomic(run_dir / "metrics.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    table = markdown_table(rows)
    write_text_atomic(run_dir / "metrics.md", table + "\n")
    plot_run(rows, run_dir / "plot.png")
    print(table, flush=True)
    print(f"[online-dpo] wrote {run_dir / 'metrics.jsonl'}, {run_dir / 'plot.png'}", flush=True)
    return rows


def _fmt(value, fmt: str, ci=None) -> str:
    """A value, and its 95% interval compactly where it has one: `0.412 [0.33, 0.49]`."""
    if value is None:
        return "-"
    return fmt.format(value) + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def markdown_table(rows: list[dict]) -> str:
    header = "| " + " | ".join(title for _, title, _ in TABLE_COLUMNS) + " |"
    rule = "|" + "|".join("---:" for _ in TABLE_COLUMNS) + "|"
    body = ["| " + " | ".join(_fmt(r.get(key), fmt, r.get(CI_KEYS.get(key))) for key, _, fmt in TABLE_COLUMNS)
            + " |" for r in rows]
    alarms = [alarm_message(r["gaming_alarm"]) for r in rows if r.get("gaming_alarm")]
    return "\n".join([header, rule, *body, *([""] + alarms if alarms else [])])


def round_line(k: int, metrics: dict) -> str:
    """The line run.py prints after each round; held-out numbers with their 95% intervals."""
    parts = [f"{key}={metrics[key]:.4g}" for key in ("judge_score", "loss", "accuracy", "kl_to_reference")
             if isinstance(metrics.get(key), float)]
    for key, name in (("eval_judge_score", "eval_score"), ("win_rate_vs_pi0", "win_rate_vs_pi0")):
        if isinstance(metrics.get(key), (int, float)):
            ci = metrics.get(CI_KEYS[key])
            parts.append(f"{name}={metrics[key]:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""))
    return f"[online-dpo] round {k}: " + ", ".join(parts)


def integer_rounds(ax, rounds) -> None:
    """Whole rounds only on a round axis, even for a single round (where MaxNLocator alone gives
    fractional ticks)."""
    from matplotlib.ticker import MaxNLocator

    rounds = sorted({int(k) for k in rounds})
    if 0 < len(rounds) <= 12:
        ax.set_xticks(rounds)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def run_figure(rows: list[dict]):
    """The run's plot as a matplotlib Figure (the caller closes it): mean judge score of fresh
    samples and of held-out prompts per round with 95% bands (left), KL to the reference (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):  # rounds without the metric (offline, or not evaluated: eval.every) are left out
        kept = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
        return ([k for k, _ in kept], [v for _, v in kept])

    def band(ax, key, line):  # the 95% intervals, shaded in the line's colour
        kept = [(r["round"], *r[CI_KEYS[key]]) for r in rows if r.get(key) is not None and r.get(CI_KEYS[key])]
        if kept:
            xs, lo, hi = zip(*kept)
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    band(ax1, "judge_score", ax1.plot(*series("judge_score"), "o-", label="fresh samples")[0])
    band(ax1, "eval_judge_score", ax1.plot(*series("eval_judge_score"), "s--", label="held-out (after update)")[0])
    ax1.set_xlabel("round")
    ax1.set_ylabel("mean judge score")
    ax1.legend()
    ax2.plot(*series("kl_to_reference"), "o-", color="tab:red")
    ax2.set_xlabel("round")
    ax2.set_ylabel("KL to reference (nats)")
    for ax in (ax1, ax2):
        integer_rounds(ax, [r["round"] for r in rows])
    fig.tight_layout()
    return fig


def plot_run(rows: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = run_figure(rows)
    try:
        tmp = path.with_name(path.name + ".tmp.png")
        fig.savefig(tmp, dpi=100)
        tmp.replace(path)
    finally:
        plt.close(fig)
