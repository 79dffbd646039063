"""Draws docs/instruction_following.png from a finished run of recipes/instruction_following.yaml:
IFEval's prompt- and instruction-level strict accuracy on the held-out prompts per round (pi_0 at
round 0), with their 95% intervals, and the constraint-blind win rate against pi_0.

    .venv/bin/python scripts/plot_instruction_following.py [runs/instruction_following] [docs/instruction_following.png]
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

run = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/instruction_following")
out = Path(sys.argv[2] if len(sys.argv) > 2 else "docs/instruction_following.png")
pi0 = json.loads((run / "round_0" / "pi0_eval.json").read_text())["judge_metrics"]
rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
fig, (acc, win) = plt.subplots(1, 2, figsize=(10, 3.6))
for key, label, marker in (("prompt_level_strict_accuracy", "prompt-level (every constraint)", "o"),
                           ("instruction_level_strict_accuracy", "instruction-level", "s")):
    rounds = [0, *(r["round"] for r in rows)]
    values = [pi0[key], *(r[f"eval_{key}"] for r in rows)]
    lows = [pi0[f"{key}_ci"][0], *(r[f"eval_{key}_ci"][0] for r in rows)]
    highs = [pi0[f"{key}_ci"][1], *(r[f"eval_{key}_ci"][1] for r in rows)]
    line, = acc.plot(rounds, values, marker=marker, label=label)
    acc.fill_between(rounds, lows, highs, alpha=0.2, color=line.get_color())
acc.set(xlabel="round (0: π0)", ylabel="held-out strict accuracy", title="IFEval's checkers, 60 held-out prompts")
acc.legend(loc="upper left")
rounds = [r["round"] for r in rows]
win.plot(rounds, [r["win_rate_vs_pi0"] for r in rows], "o-", color="tab:green")
win.fill_between(rounds, *zip(*(r["win_rate_vs_pi0_ci"] for r in rows), strict=True), alpha=0.2, color="tab:green")
win.axhline(0.5, color="grey", lw=0.8, ls="--")
win.set(xlabel="round", ylabel="win rate vs π0", title="a judge blind to the constraints", ylim=(0.2, 0.8))
for ax in (acc, win):
    ax.set_xticks(range(0, len(rows) + 1) if ax is acc else rounds)
fig.tight_layout()
fig.savefig(out, dpi=110)
print(out)
