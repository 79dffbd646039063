"""Per-round metrics from step summaries, the run's metrics.jsonl, a markdown table and a plot."""

from __future__ import annotations

import json
from pathlib import Path

from online_dpo.artifacts import read_json, read_jsonl, write_text_atomic

PHASES = ("sample", "judge", "pairs", "train", "sync", "eval", "reference")

TABLE_COLUMNS = [
    ("round", "round", "{}"),
    ("judge_score", "judge score", "{:.3f}"),
    ("eval_judge_score", "eval score", "{:.3f}"),
    ("loss", "loss", "{:.4f}"),
    ("accuracy", "pref. acc", "{:.2f}"),
    ("reward_margin", "margin", "{:.3f}"),
    ("kl_to_reference", "KL(ref)", "{:.3f}"),
    ("mean_length", "len", "{:.1f}"),
    ("eos_rate", "EOS", "{:.2f}"),
    ("pairs_kept", "kept", "{}"),
    ("pairs_dropped", "dropped", "{}"),
    ("sync_seconds", "sync s", "{:.2f}"),
    ("round_seconds", "round s", "{:.0f}"),
]


def round_metrics(round_dir: Path, k: int) -> dict:
    summaries = {p: read_json(round_dir / f"{p}.json") for p in PHASES}
    samples = [s for rec in read_jsonl(round_dir / "samples.jsonl") for s in rec["samples"]]
    train, judge = summaries["train"], summaries["judge"]
    metrics = {
        "round": k,
        "judge_score": judge["judge_score"],
        "mean_length": sum(s["num_tokens"] for s in samples) / len(samples),
        "eos_rate": sum(s["finished"] for s in samples) / len(samples),
        "pairs_kept": judge["pairs_kept"],
        "pairs_tied": judge["pairs_tied"],
        "pairs_failed": judge["pairs_failed"],
        "pairs_dropped": judge["pairs_tied"] + judge["pairs_failed"],
        "generation_seconds": summaries["sample"]["generation_seconds"],
        "sampled_tokens": summaries["sample"]["sampled_tokens"],
        "tokens_per_second": summaries["sample"]["tokens_per_second"],
        "reference_source_round": summaries["reference"]["source_round"],
    }
    # Judge-layer statistics (flip rate, vote agreement, retries, cache hits, length preference).
    metrics.update({key: v for key, v in judge.items() if key not in metrics and key != "seconds"})
    for key in ("loss", "accuracy", "chosen_reward", "rejected_reward", "reward_margin",
                "grad_norm", "optimizer_steps", "train_pairs", "reference_logps_from"):
        metrics[key] = train.get(key)
    for key in ("sync_seconds", "probe_max_abs_diff"):
        metrics[key] = summaries["sync"].get(key)
    metrics.update({k2: v for k2, v in summaries["eval"].items() if k2 != "seconds"})
    metrics["phase_seconds"] = {p: summaries[p]["seconds"] for p in PHASES}
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


def _fmt(value, fmt: str) -> str:
    if value is None:
        return "-"
    return fmt.format(value)


def markdown_table(rows: list[dict]) -> str:
    header = "| " + " | ".join(title for _, title, _ in TABLE_COLUMNS) + " |"
    rule = "|" + "|".join("---:" for _ in TABLE_COLUMNS) + "|"
    body = ["| " + " | ".join(_fmt(r.get(key), fmt) for key, _, fmt in TABLE_COLUMNS) + " |"
            for r in rows]
    return "\n".join([header, rule, *body])


def plot_run(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(rounds, [r["judge_score"] for r in rows], "o-", label="fresh samples")
    ax1.plot(rounds, [r.get("eval_judge_score") for r in rows], "s--", label="held-out (after update)")
    ax1.set_xlabel("round")
    ax1.set_ylabel("mean judge score")
    ax1.legend()
    ax2.plot(rounds, [r.get("kl_to_reference") for r in rows], "o-", color="tab:red")
    ax2.set_xlabel("round")
    ax2.set_ylabel("KL to reference (nats)")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
