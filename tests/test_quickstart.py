"""The quickstart recipe as `make run` runs it, shortened: real SmolLM2, real vLLM, the strict
exact-match held-out metric with its 95% interval written for pi_0 and every evaluated round."""

import json
import re

import pytest

from judges.functions import ExactAnswerJudge, final_number
from tests.conftest import REPO, cli

pytestmark = pytest.mark.slow


def test_quickstart_shortened_writes_the_held_out_metric_and_its_interval(tmp_path):
    out = cli("run", str(REPO / "recipes" / "quickstart.yaml"), f"output_dir={tmp_path}", "rounds=2",
              "data.prompts_per_round=4", "data.eval_prompts=6", "generation.max_tokens=8",
              "train.epochs=1")
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "quickstart"
    pi0 = json.loads((run / "round_0" / "pi0_eval.json").read_text())
    lo, hi = pi0["judge_score_ci"]
    assert 0 <= lo <= pi0["judge_score"] <= hi <= 1
    held_out = [json.loads(x) for x in (REPO / "recipes" / "data" / "times_and_sums.jsonl").read_text().splitlines()][-6:]
    for k in (1, 2):
        ev = json.loads((run / f"round_{k}" / "eval.json").read_text())
        lo, hi = ev["eval_judge_score_ci"]
        assert 0 <= lo <= ev["eval_judge_score"] <= hi <= 1
        samples = [json.loads(x) for x in (run / f"round_{k}" / "eval_samples.jsonl").read_text().splitlines()]
        assert [s["row"] for s in samples] == held_out  # the file's last data.eval_prompts rows
        # The metric is the strict judge's: recompute it from the samples.
        scores = [ExactAnswerJudge().score(s["row"], c["text"]) for s in samples for c in s["samples"]]
        assert ev["eval_judge_score"] == pytest.approx(sum(scores) / len(scores))
    assert "eval_score=" in out.stdout and "[" in out.stdout  # the round line shows the interval
    # A quiet console: nothing but progress bars, our own lines and the result table, on either
    # stream (vLLM's harmless start-up alarms are dropped: online_dpo/console.py).
    bar = re.compile(r"\[\d+:\d+(<[\d:?]+)?, [^\]]*\]")  # tqdm's [elapsed<left, rate], a total known or not
    lines = [line.strip() for line in re.split(r"[\r\n]", out.stdout + out.stderr)]
    others = [line for line in lines if line and not line.startswith(("[online-dpo]", "|")) and not bar.search(line)]
    assert not others, others


def test_exact_answer_judge_takes_only_the_final_number():
    judge, row = ExactAnswerJudge(), {"answer": "24"}
    assert judge.score(row, "24") == 1.0
    assert judge.score(row, "The answer is 24.") == 1.0
    assert judge.score(row, "23, 24, 25") == 0.0  # listing candidates does not pay
    assert judge.score(row, "24 apples, or maybe 25") == 0.0
    assert judge.score(row, "I do not know.") == 0.0
    assert [final_number(t) for t in ("1,024", "-3", "2.50", "7.")] == ["1024", "-3", "2.5", "7"]
    with pytest.raises(KeyError, match="no gold-answer column 'answer'"):
        judge.score({"prompt": "x"}, "1")


def test_held_out_problems_never_appear_in_training():
    rows = [json.loads(x) for x in (REPO / "recipes" / "data" / "times_and_sums.jsonl").read_text().splitlines()]
    train, held_out = rows[:-100], rows[-100:]
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    assert all(str(eval(r["prompt"].split("What is ")[1].split("?")[0].replace("times", "*"))) == r["answer"]
               for r in rows)
