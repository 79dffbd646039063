"""Writes times_and_sums.jsonl: times tables (2-9 x 2-12) and sums of two numbers up to 20, with
gold answers. The last 100 rows are the held-out set (`data.eval_prompts: 100` takes the file's
tail), and no (operation, a, b) in them appears among the training rows.

    python recipes/data/make_arithmetic.py
"""

import json
import random
from pathlib import Path

HELD_OUT = 100


def problems() -> list[dict]:
    rows = [{"prompt": f"What is {a} times {b}? Reply with the number only.", "answer": str(a * b)}
            for a in range(2, 10) for b in range(2, 13)]
    rows += [{"prompt": f"What is {a} + {b}? Reply with the number only.", "answer": str(a + b)}
             for a in range(1, 21) for b in range(1, 21) if a <= b]
    random.Random(0).shuffle(rows)
    return rows


if __name__ == "__main__":
    rows = problems()
    train, held_out = rows[:-HELD_OUT], rows[-HELD_OUT:]
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    out = Path(__file__).with_name("times_and_sums.jsonl")
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{out}: {len(train)} training and {len(held_out)} held-out problems")
