"""LLM-as-judge: strict verdict parsing, every HTTP fault against a real local server, API-key
hygiene, and the real endpoint path against `vllm serve` of SmolLM2."""

import random
import time

import pytest

from judges.bias import BothOrders
from judges.llm import LLMJudge, VerdictParseError, _retry_after, parse_verdict
from judges.loading import build_judge_stack
from judges.protocol import JudgeConfigError, Preference
from judges.reliable import MAX_RETRY_AFTER_S, ReliableJudge
from online_dpo.config.recipe import JudgeConfig, recipe_from_dict
from online_dpo.pipeline.pair_selection import judge_prompts
from online_dpo.pipeline.run import Run
from tests.conftest import tiny_recipe_dict
from tests.servers import ScriptedServer, VLLMServer, chat_reply, free_port

ROW = {"prompt": "What is the capital of France?"}
GOOD, BAD = "Paris is the capital of France.", "Bananas are yellow."
SECRET = "sk-test-0123456789abcdef"


@pytest.mark.parametrize("reply, expected", [("A", Preference.FIRST), (" b.\n", Preference.SECOND),
                                             ("TIE", Preference.TIE), ("Verdict: A", Preference.FIRST),
                                             ("Let me think.\nB", Preference.SECOND)])
def test_parse_verdict(reply, expected):
    assert parse_verdict(reply) == expected


@pytest.mark.parametrize("reply", ["A: A is the", "Answer A is better", "", "C", "A or B"])
def test_parse_verdict_is_strict(reply):
    with pytest.raises(VerdictParseError):
        parse_verdict(reply)


def http_judge(url, sleep=time.sleep, **kwargs):
    judge = LLMJudge(backend="http", model="m", base_url=url, **kwargs)
    return ReliableJudge(judge, fingerprint="t", retries=2, backoff_s=0.01, sleep=sleep)


@pytest.fixture
def server():
    servers = []

    def make(script):
        servers.append(ScriptedServer(script))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def test_recovers_from_5xx_and_429(server):
    s = server([(500, b"oops", 0), (429, b"slow down", 0), (200, chat_reply("A"), 0)])
    judgment = http_judge(s.url).judge(ROW, GOOD, BAD)
    assert judgment.preference == Preference.FIRST and len(s.requests) == 3


@pytest.mark.parametrize("status, needle", [(503, "HTTP 503 (server error)"), (429, "HTTP 429 (rate limited)")])
def test_persistent_http_errors_become_failures(server, status, needle):
    s = server([(status, b"nope", 0)])
    judgment = http_judge(s.url).judge(ROW, GOOD, BAD)
    assert judgment.preference == Preference.FAILED and needle in judgment.reason
    assert len(s.requests) == 3  # bounded: 1 + 2 retries


def test_malformed_json_and_unparseable_verdicts(server):
    s = server([(200, b"{not json", 0)])
    assert "malformed response" in http_judge(s.url).judge(ROW, GOOD, BAD).reason
    s2 = server([(200, chat_reply("I think A is the better one"), 0)])
    assert "unparseable verdict" in http_judge(s2.url).judge(ROW, GOOD, BAD).reason


def test_slow_server_times_out(server):
    s = server([(200, chat_reply("A"), 3.0)])
    t0 = time.monotonic()
    judgment = http_judge(s.url, timeout_s=0.3).judge(ROW, GOOD, BAD)
    assert judgment.preference == Preference.FAILED and "timed out" in judgment.reason
    assert "failed after 3 attempts" in judgment.reason and len(s.requests) == 3  # timeouts retry
    assert time.monotonic() - t0 < 2.5  # three 0.3 s attempts, not three 3 s answers


def test_429_waits_for_retry_after_then_succeeds(server):
    s = server([(429, b"slow down", 0, {"Retry-After": "2"}), (200, chat_reply("B"), 0)])
    sleeps = []
    judge = http_judge(s.url, sleep=sleeps.append)
    assert judge.judge(ROW, GOOD, BAD).preference == Preference.SECOND and len(s.requests) == 2
    assert len(sleeps) == 1 and 2.0 <= sleeps[0] <= 2.2  # the server's 2 s (plus jitter), not 0.01 s
    assert judge.pop_stats()["judge_retries"] == 1


def test_503_is_retried_with_backoff(server):
    s = server([(503, b"busy", 0), (503, b"busy", 0), (200, chat_reply("A"), 0)])
    sleeps = []
    assert http_judge(s.url, sleep=sleeps.append).judge(ROW, GOOD, BAD).preference == Preference.FIRST
    assert len(s.requests) == 3 and 0.01 <= sleeps[0] <= 0.011 and 0.02 <= sleeps[1] <= 0.022


def test_retry_after_is_read_and_capped(server):
    assert _retry_after("3") == 3.0 and _retry_after("0.5") == 0.5 and _retry_after(None) is None
    assert _retry_after("soon") is None and _retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    s = server([(503, b"maintenance", 0, {"Retry-After": "3600"}), (200, chat_reply("A"), 0)])
    sleeps = []
    assert http_judge(s.url, sleep=sleeps.append).judge(ROW, GOOD, BAD).preference == Preference.FIRST
    assert MAX_RETRY_AFTER_S <= sleeps[0] <= 1.1 * MAX_RETRY_AFTER_S  # an hour is cut to the cap


def test_401_stops_at_once_without_the_key(server, monkeypatch):
    monkeypatch.setenv("JUDGE_API_KEY", SECRET)
    s = server([(401, b'{"error": "bad key ' + SECRET.encode() + b'"}', 0), (200, chat_reply("A"), 0)])
    sleeps = []
    judge = BothOrders(http_judge(s.url, sleep=sleeps.append, api_key_env="JUDGE_API_KEY"))
    with pytest.raises(JudgeConfigError, match="HTTP 401") as info:
        judge.judge(ROW, GOOD, BAD)
    assert len(s.requests) == 1 and not sleeps  # not retried: no key gets better by asking again
    assert s.url in str(info.value) and SECRET not in str(info.value) and "***" in str(info.value)


def test_400_is_not_retried_and_fails_that_pair(server):
    s = server([(400, b'{"error": "prompt too long"}', 0), (200, chat_reply("A"), 0)])
    sleeps = []
    judgment = http_judge(s.url, sleep=sleeps.append).judge(ROW, GOOD, BAD)
    assert judgment.preference == Preference.FAILED and len(s.requests) == 1 and not sleeps
    assert "HTTP 400" in judgment.reason and "prompt too long" in judgment.reason
    assert "not retryable" in judgment.reason and s.url in judgment.reason


def test_close_closes_the_connection_pool(server):
    s = server([(200, chat_reply("A"), 0)])
    judge = http_judge(s.url)
    assert judge.judge(ROW, GOOD, BAD).preference == Preference.FIRST
    client = judge.inner.backend.client
    assert not client.is_closed
    judge.close()
    assert client.is_closed


def test_connection_refused():
    judgment = http_judge(f"http://127.0.0.1:{free_port()}/v1").judge(ROW, GOOD, BAD)
    assert judgment.preference == Preference.FAILED and "cannot reach" in judgment.reason


def test_api_key_is_sent_but_never_written(server, tiny_model_dir, prompts_file, tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_API_KEY", SECRET)
    s = server([(500, SECRET.encode(), 0), (200, chat_reply("A"), 0)])
    judge = {"target": "judges.llm:LLMJudge", "retries": 1, "backoff_s": 0.01,
             "kwargs": {"backend": "http", "model": "m", "base_url": s.url, "api_key_env": "JUDGE_API_KEY"}}
    data = tiny_recipe_dict(tiny_model_dir, prompts_file, tmp_path / "runs", judge=judge, rounds=1,
                            **{"generation.samples_per_prompt": 2})
    Run(recipe_from_dict(data)).execute()
    assert s.requests[0]["headers"]["Authorization"] == f"Bearer {SECRET}"
    for path in (tmp_path / "runs").rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl", ".yaml", ".md"):
            assert SECRET not in path.read_text(), path
    # The server echoed the key in its 500 body; the failure reason must not repeat it.
    reply = ReliableJudge(LLMJudge(backend="http", model="m", base_url=s.url, api_key_env="JUDGE_API_KEY"),
                          fingerprint="x", retries=0)
    s.script[:] = [(500, SECRET.encode(), 0)]
    assert SECRET not in reply.judge(ROW, GOOD, BAD).reason


def test_missing_api_key_env_is_a_clear_failure(server, monkeypatch):
    monkeypatch.delenv("NOT_SET_KEY", raising=False)
    s = server([(200, chat_reply("A"), 0)])
    with pytest.raises(JudgeConfigError, match="NOT_SET_KEY"):  # when the judge is built
        http_judge(s.url, api_key_env="NOT_SET_KEY")
    monkeypatch.setenv("NOT_SET_KEY", SECRET)
    judge = http_judge(s.url, api_key_env="NOT_SET_KEY", sleep=lambda s: pytest.fail("retried"))
    monkeypatch.delenv("NOT_SET_KEY")  # unset mid-run: the next call stops, sending nothing
    with pytest.raises(JudgeConfigError, match=r"NOT_SET_KEY \(judge api_key_env\) is not set"):
        judge.judge(ROW, GOOD, BAD)
    assert not s.requests


def test_template_must_have_its_fields():
    with pytest.raises(ValueError, match="lacks {second}"):
        LLMJudge(backend="http", model="m", base_url="http://127.0.0.1:1", template="{prompt} {first}")


@pytest.mark.slow
def test_real_vllm_serve_endpoint(smollm2_dir, tiny_model_dir, prompts_file, tmp_path):
    server = VLLMServer(smollm2_dir)
    try:
        kwargs = {"backend": "http", "model": "smollm2", "base_url": server.url,
                  # vLLM's structured outputs make even a 135M judge answer exactly A/B/TIE.
                  "extra_body": {"structured_outputs": {"choice": ["A", "B", "TIE"]}}}
        judge = LLMJudge(**kwargs)
        verdicts = {judge.judge(ROW, GOOD, BAD).preference, judge.judge(ROW, BAD, GOOD).preference}
        judge.close()
        assert verdicts <= {Preference.FIRST, Preference.SECOND, Preference.TIE}
        # A short real run judged by the served model, with both-orders bias control on.
        data = tiny_recipe_dict(tiny_model_dir, prompts_file, tmp_path / "runs", rounds=1,
                                judge={"target": "judges.llm:LLMJudge", "kwargs": kwargs,
                                       "both_orders": True, "max_failure_rate": 1.0},
                                **{"generation.samples_per_prompt": 2})
        rows = Run(recipe_from_dict(data)).execute()
        assert rows[0]["position_flip_rate"] is not None
        assert rows[0]["pairs_failed"] == 0
        judgments = (tmp_path / "runs" / "tiny" / "round_1" / "judgments.jsonl").read_text()
        assert "LLM verdict" in judgments or "order-dependent" in judgments
        # Concurrency changes when a verdict comes back, never what it is, nor which comparison it
        # belongs to. The served model repeats the second answer's letter (checked by hand: A, B or
        # TIE), so each verdict depends on its own request, and one routed to another comparison
        # changes the pairs. 8 prompts x 4 answers, both orders, serially and 16 at once.
        letters = {**kwargs, "template": "Repeat this letter: {second}\n(ignore: {prompt} {first})"}
        rng = random.Random(3)
        # B beats A in both orders; any other comparison ties or depends on the order. So the 2
        # prompts without a B give no pair, and some of the 6 with an A and a B give one.
        answers = [rng.sample(["A", "B", rng.choice(["A", "B", "TIE"]), "TIE"], 4) for _ in range(6)]
        answers += [rng.sample(["A", "A", "TIE", "TIE"], 4) for _ in range(2)]
        prompts = [({"prompt": f"question {i}"}, texts) for i, texts in enumerate(answers)]
        results, flips = {}, {}
        for concurrency in (1, 16):
            cfg = JudgeConfig(target="judges.llm:LLMJudge", kwargs=letters, both_orders=True,
                              concurrency=concurrency, retries=0)
            judge, _ = build_judge_stack(cfg, cache_path=None)
            try:
                results[concurrency] = list(judge_prompts(judge, prompts, "best_vs_worst", random.Random(0),
                                                          concurrency=judge.concurrency))
                layer = judge
                while not isinstance(layer, BothOrders):  # the stack's bias-control layer
                    layer = layer.inner
                flips[concurrency] = layer.pop_stats()["position_flip_rate"]
            finally:
                judge.close()
        assert results[1] == results[16] and flips[1] == flips[16]
        statuses = [r["status"] for r in results[1]]
        assert "kept" in statuses[:6] and statuses[6:] == ["tie", "tie"], statuses
    finally:
        server.close()


@pytest.mark.slow
def test_local_backends_give_the_same_greedy_reply(smollm2_dir):
    """Both in-process backends (transformers, vLLM) run SmolLM2 greedily on the judge prompt:
    their replies must agree, and the judgment is a parsed verdict or a recorded parse failure."""
    replies = {}
    for backend in ("transformers", "vllm"):
        judge = LLMJudge(backend=backend, model="smollm2", max_tokens=6)
        try:
            prompt = judge.template.format(prompt=ROW["prompt"], first=GOOD, second=BAD)
            replies[backend] = judge.backend.complete([{"role": "user", "content": prompt}])
            judgment = ReliableJudge(judge, fingerprint=backend, retries=0).judge(ROW, GOOD, BAD)
        finally:
            judge.close()
        assert judgment.preference != Preference.FAILED or "unparseable verdict" in judgment.reason
    assert replies["transformers"].strip() and replies["transformers"] == replies["vllm"]


def test_a_conversation_reaches_the_judge_whole(server, tiny_model_dir, tmp_path):
    """data.prompts from a messages column: the system prompt and the earlier turns are sampled
    from and reach the LLM judge's request; the recorded reply does not."""
    import json

    import yaml

    from tests.conftest import cli, tiny_recipe_dict

    s = server([(200, chat_reply("A"), 0)])
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [
        {"role": "system", "content": "Answer in French."}, {"role": "user", "content": f"Name {i}?"},
        {"role": "assistant", "content": "RECORDED REPLY"}]}) + "\n" for i in range(8)))
    body = tiny_recipe_dict(tiny_model_dir, chats, tmp_path / "runs", rounds=1,
                            judge={"target": "judges.llm:LLMJudge", "retries": 0,
                                   "kwargs": {"backend": "http", "model": "m", "base_url": s.url}})
    body["data"].update(prompts={"path": str(chats), "messages_column": "messages"}, eval_prompts=2)
    recipe = tmp_path / "chats.yaml"
    recipe.write_text(yaml.safe_dump(body))
    done = cli("run", str(recipe))
    assert done.returncode == 0, done.stderr[-3000:]
    contents = [r["body"]["messages"][-1]["content"] for r in s.requests]
    assert contents and all("System: Answer in French.\n\nUser: Name " in c for c in contents)
    assert not any("RECORDED REPLY" in c for c in contents)
