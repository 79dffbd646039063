"""Concurrent judging (judge.concurrency): the same judgments and pairs as serial, against a judge
server that answers out of order and refuses some requests with 429 and 500; a kill mid-step
loses only what was in flight, and a resume pays for no cached judgment again."""

import json
import random
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler

import pytest
import yaml

from judges.loading import build_judge_stack
from online_dpo.pipeline.pair_selection import judge_prompts
from tests.conftest import tiny_recipe_dict
from tests.servers import chat_reply, serve_in_thread, stop
from tests.test_resume import run_cli

TEMPLATE = "{prompt}|{first}|{second}"  # the server reads the two responses back from this


class PickyServer:
    """An OpenAI-style chat server that prefers the shorter response, by content alone. Each
    request waits a random 0-40 ms (answers come back out of order); the first attempt at every
    third distinct comparison is refused, alternately with 429 (Retry-After: 0) and 500."""

    def __init__(self):
        self.lock = threading.Lock()
        self.attempts: dict[str, int] = {}
        self.answered: dict[str, int] = {}  # 200s sent, per comparison
        self.in_flight = self.most_in_flight = self.refused = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                content = body["messages"][-1]["content"]
                _, first, second = content.split("|")
                with server.lock:
                    server.in_flight += 1
                    server.most_in_flight = max(server.most_in_flight, server.in_flight)
                    attempt = server.attempts.get(content, 0)
                    server.attempts[content] = attempt + 1
                    refuse = attempt == 0 and len(server.attempts) % 3 == 0
                    server.refused += refuse
                time.sleep(random.uniform(0, 0.04))
                if refuse:
                    status, reply = (429, b"slow down") if server.refused % 2 else (500, b"oops")
                else:
                    status = 200
                    reply = chat_reply("A" if len(first) < len(second) else "B" if len(second) < len(first) else "TIE")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.end_headers()
                self.wfile.write(reply)
                with server.lock:
                    server.in_flight -= 1
                    if status == 200:
                        server.answered[content] = server.answered.get(content, 0) + 1

            def log_message(self, *args):
                pass

        self.httpd = serve_in_thread(Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def reset(self):
        with self.lock:
            self.attempts.clear()
            self.answered.clear()
            self.most_in_flight = self.refused = 0

    def close(self):
        stop(self.httpd)


@pytest.fixture
def picky():
    server = PickyServer()
    yield server
    server.close()


def judge_config(url, **keys):
    return {"target": "judges.llm:LLMJudge", "retries": 3, "backoff_s": 0.01,
            "kwargs": {"backend": "http", "model": "m", "base_url": url, "template": TEMPLATE}, **keys}


def prompts(n=12, samples=4, seed=0):
    rng = random.Random(seed)
    return [({"prompt": f"question {i}"}, ["x" * rng.randint(1, 9) for _ in range(samples)]) for i in range(n)]


@pytest.mark.parametrize("both_orders", [False, True])
def test_concurrent_judgments_and_pairs_equal_serial(picky, tmp_path, both_orders):
    from online_dpo.config.recipe import JudgeConfig

    results, stats = {}, {}
    for concurrency in (1, 8):
        picky.reset()  # the same comparisons are refused the first time in both runs
        cfg = JudgeConfig(**judge_config(picky.url, both_orders=both_orders, concurrency=concurrency))
        judge, _ = build_judge_stack(cfg, cache_path=None)
        for strategy in ("best_vs_worst", "random"):
            results[concurrency, strategy] = list(judge_prompts(judge, prompts(), strategy, random.Random(7),
                                                                concurrency=judge.concurrency))
        layer, stats[concurrency] = judge, {}
        while layer is not None:
            stats[concurrency].update(layer.pop_stats() if hasattr(layer, "pop_stats") else {})
            layer = getattr(layer, "inner", None)
        judge.close()
    for strategy in ("best_vs_worst", "random"):
        assert results[1, strategy] == results[8, strategy]
        assert all(r["status"] in ("kept", "tie") for r in results[1, strategy])  # every refusal was retried
    assert stats[8]["judge_concurrency"] == 8 and stats[8]["judge_retries"] > 0
    if both_orders:
        assert stats[1]["position_flip_rate"] == stats[8]["position_flip_rate"] == 0.0
    assert picky.most_in_flight > 1 and picky.refused > 0  # of the concurrent run


def test_a_killed_concurrent_judge_step_resumes_without_paying_twice(picky, tiny_model_dir, prompts_file, tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(
        tiny_model_dir, prompts_file, tmp_path / "runs", rounds=1, judge=judge_config(picky.url, concurrency=4),
        **{"eval.win_rate_vs_pi0": False})))
    straight = run_cli(recipe, "name=straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    picky.reset()
    killed = run_cli(recipe, "name=killed", kill_at="round_1/judge_prompt_2")  # 2 of 4 taken, more in flight
    assert killed.returncode == -signal.SIGKILL
    resumed = run_cli(recipe, "name=killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rounds = tmp_path / "runs"
    judgments = [(rounds / n / "round_1" / "judgments.jsonl").read_text() for n in ("straight", "killed")]
    assert judgments[0] == judgments[1]  # the same comparisons, verdicts and pairs
    judge = json.loads((rounds / "killed" / "round_1" / "judge.json").read_text())
    comparisons = sum(len(json.loads(line)["comparisons"]) for line in judgments[1].splitlines())
    assert judge["judge_cache_hits"] >= 2 * 3  # at least the 2 prompts taken before the kill
    assert judge["judge_cache_hits"] + judge["judge_calls"] - judge["judge_retries"] == comparisons
    # A comparison is answered twice only if its answer was in flight when the run was killed
    # (sent, not yet cached): at most one per concurrent prompt.
    assert len(picky.answered) == comparisons
    assert sum(n - 1 for n in picky.answered.values()) <= 4

def test_one_prompts_comparisons_are_judged_concurrently(picky):
    """A round of one prompt with 6 samples: its 15 round-robin comparisons are the units in
    flight, with the same judgment as serial."""
    from online_dpo.config.recipe import JudgeConfig

    results, in_flight = {}, {}
    for concurrency in (1, 8):
        picky.reset()
        judge, _ = build_judge_stack(JudgeConfig(**judge_config(picky.url, concurrency=concurrency)), cache_path=None)
        results[concurrency] = list(judge_prompts(judge, prompts(n=1, samples=6), "best_vs_worst",
                                                  random.Random(7), concurrency=judge.concurrency))
        in_flight[concurrency] = picky.most_in_flight
        judge.close()
    assert results[1] == results[8] and len(results[8][0]["comparisons"]) == 15
    assert in_flight[1] == 1 and in_flight[8] > 1


def test_both_orders_of_a_comparison_are_in_flight_together(picky):
    """judge.both_orders at concurrency 2: one comparison's two orders go at once (the bound still
    holds: one judgment of two requests); serial sends them one after the other."""
    from online_dpo.config.recipe import JudgeConfig

    results, in_flight = {}, {}
    for concurrency in (1, 2):
        picky.reset()
        cfg = JudgeConfig(**judge_config(picky.url, both_orders=True, concurrency=concurrency))
        judge, _ = build_judge_stack(cfg, cache_path=None)
        results[concurrency] = list(judge_prompts(judge, prompts(n=3, samples=2), "best_vs_worst",
                                                  random.Random(7), concurrency=judge.concurrency))
        in_flight[concurrency] = picky.most_in_flight
        judge.close()
    assert results[1] == results[2]
    assert in_flight[1] == 1 and in_flight[2] == 2
