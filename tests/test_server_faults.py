"""generation.backend: vllm_server: recipe checks and the client's fault handling. Every request
has a timeout, and every failure names the URL and the step: checked against small scripted HTTP
servers on 127.0.0.1 (the real `vllm serve` paths are in test_server_sampling.py)."""

import time

import pytest
import torch

from online_dpo.config.recipe import RecipeError, recipe_from_dict
from online_dpo.pipeline.run import Run
from online_dpo.sampling.generator import SamplingSettings
from online_dpo.sampling.vllm_server import ServerError, VLLMServerGenerator, default_transfer_dir
from tests.conftest import tiny_recipe_dict
from tests.servers import RouteServer, free_port

HEALTHY = {("GET", "/health"): (200, {}, 0), ("GET", "/weight_info"): (200, {"weight_version": "default"}, 0),
           ("POST", "/init_weight_transfer_engine"): (200, {}, 0), ("GET", "/is_paused"): (200, {"is_paused": False}, 0)}
SETTINGS = SamplingSettings(n=2, temperature=1.0, top_p=1.0, max_tokens=4, seed=0)


def client(server, tmp_path, timeout_s=5.0):
    return VLLMServerGenerator(server.url, timeout_s=timeout_s, transfer_dir=tmp_path, dtype=torch.float32)


@pytest.fixture
def serve():
    servers = []

    def start(extra=None, base=HEALTHY):
        servers.append(RouteServer({**base, **(extra or {})}))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def test_a_slow_server_times_out_naming_url_and_step(serve, tmp_path):
    server = serve({("POST", "/inference/v1/generate"): (200, {}, 20)})
    gen = client(server, tmp_path, timeout_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(ServerError, match=f"vLLM server at {server.url}: sampling prompt 0 timed out after 0.5 s"):
        gen.generate([[1, 2, 3]], SETTINGS)
    assert time.monotonic() - t0 < 15  # the timeout, not the 20 s server, ended the wait


def test_5xx_and_a_missing_rl_api_are_named(serve, tmp_path):
    server = serve({("POST", "/inference/v1/generate"): (500, {"error": "engine dead"}, 0)})
    with pytest.raises(ServerError, match="scoring the probe answered HTTP 500: .*engine dead"):
        client(server, tmp_path).score([1, 2], [3])
    bare = serve(base={("GET", "/health"): (200, {}, 0)})  # a plain `vllm serve`: no RL API
    with pytest.raises(ServerError, match="reading the weight version .*HTTP 404.*VLLM_SERVER_DEV_MODE=1"):
        client(bare, tmp_path)


def test_a_server_without_the_file_transfer_backend_is_told_how_to_start(serve, tmp_path):
    server = serve({("POST", "/init_weight_transfer_engine"): (500, {"error": "Invalid weight transfer backend"}, 0)})
    with pytest.raises(ServerError, match="needs the 'safetensors_file' weight-transfer backend.*--weight-transfer-config"):
        client(server, tmp_path)


def test_a_server_left_paused_by_a_killed_trainer_is_resumed(serve, tmp_path):
    server = serve({("GET", "/is_paused"): (200, {"is_paused": True}, 0), ("POST", "/resume"): (200, {}, 0)})
    client(server, tmp_path)
    assert ("POST", "/resume") in server.calls


def test_a_request_the_server_dropped_unanswered_is_sent_again_once(serve, tmp_path):
    # What a request meets on a pooled connection the server closes as it is sent: no answer.
    server = serve({("GET", "/health"): [(None, {}, 0), (200, {}, 0)],
                    ("POST", "/inference/v1/generate"): [(None, {}, 0)]})
    gen = client(server, tmp_path)
    assert server.calls[:2] == [("GET", "/health")] * 2
    # Dropped every time, it is a fault: named, after one more try, with no wait for a timeout.
    t0 = time.monotonic()
    with pytest.raises(ServerError, match="scoring the probe failed: no answer .*RemoteProtocolError"):
        gen.score([1, 2], [3])
    assert server.calls.count(("POST", "/inference/v1/generate")) == 2 and time.monotonic() - t0 < 4


def test_idle_connections_are_dropped_before_vllm_serve_drops_them(serve, tmp_path):
    import vllm.envs

    from judges.llm import HTTPChatBackend

    # Equal idle limits race: 1 in 60 requests sent at that idle time got no answer (online_dpo/net.py).
    judge, gen = HTTPChatBackend("http://127.0.0.1:1/v1", "m", None, 5, 0.0, 8, None), client(serve(), tmp_path)
    try:  # httpx keeps the limit in its transport's pool (httpx is pinned: requirements/common.txt)
        for http in (gen.client, judge.client):
            assert http._transport._pool._keepalive_expiry < vllm.envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE
    finally:
        gen.close()
        judge.close()


def test_a_run_pointed_where_nothing_listens_stops_with_the_url(tiny_model_dir, prompts_file, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    recipe = recipe_from_dict(tiny_recipe_dict(tiny_model_dir, prompts_file, tmp_path, **{
        "generation.backend": "vllm_server", "generation.server": {"url": url, "timeout_s": 5}}))
    t0 = time.monotonic()
    with pytest.raises(ServerError, match=f"vLLM server at {url}: the health check failed: no answer"):
        Run(recipe).execute()
    assert time.monotonic() - t0 < 120


@pytest.mark.parametrize("generation, needle", [
    ({"backend": "vllm_server"}, "generation.server: needed by generation.backend: vllm_server"),
    ({"backend": "vllm", "server": {"url": "http://x:1"}}, "read by it alone"),
    ({"backend": "vllm_server", "server": {"url": "http://x:1", "launch": {}}}, "exactly one of url"),
    ({"backend": "vllm_server", "server": {}}, "exactly one of url"),
    ({"backend": "vllm_server", "server": {"url": "10.0.0.7:8000"}}, "url must start with http://"),
    ({"backend": "vllm_server", "server": {"url": "http://x:1"}, "engines": "every_process"}, "use process0"),
    ({"backend": "vllm_server", "server": {"url": "http://x:1", "timeout": 3}}, "generation.server.timeout"),
    ({"backend": "transformers", "sleep": True}, "generation.sleep: only an in-process vLLM engine"),
])
def test_server_and_sleep_keys_are_checked_at_load(tiny_model_dir, prompts_file, tmp_path, generation, needle):
    recipe = tiny_recipe_dict(tiny_model_dir, prompts_file, tmp_path)
    recipe["generation"] = {**recipe["generation"], **generation}
    with pytest.raises(RecipeError, match=needle):
        recipe_from_dict(recipe)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_sleep_mode_is_refused_without_cuda(tiny_model_dir, prompts_file, tmp_path):
    recipe = recipe_from_dict(tiny_recipe_dict(tiny_model_dir, prompts_file, tmp_path,
                                               **{"generation.backend": "vllm", "generation.sleep": True}))
    with pytest.raises(RuntimeError, match="generation.sleep: needs CUDA"):
        Run(recipe).execute()


def test_weights_travel_through_shm_for_a_local_server_and_the_run_folder_otherwise(tmp_path):
    assert default_transfer_dir(tmp_path, None, "a/b") == default_transfer_dir(tmp_path, "http://127.0.0.1:8000", "a/b")
    assert str(default_transfer_dir(tmp_path, "http://localhost:8000", "a/b")).startswith("/dev/shm/online-dpo/")
    assert default_transfer_dir(tmp_path, "http://10.1.2.3:8000", "a/b") == tmp_path / "weight_transfer"


def test_an_update_left_open_by_a_killed_trainer_is_closed_and_the_weights_unlabelled_first(serve, tmp_path):
    ok = (200, {}, 0)
    server = serve({("POST", "/start_weight_update"): [
        (500, {"error": "start_weight_update called while a weight update is already active"}, 0), ok]})
    for path in ("/pause", "/update_weight_version", "/finish_weight_update", "/update_weights",
                 "/reset_prefix_cache", "/resume"):
        server.routes[("POST", path)] = ok
    gen = client(server, tmp_path)
    (tmp_path / "weights-stale.safetensors").write_bytes(b"left by a killed trainer")
    gen = client(server, tmp_path)  # a fresh connection clears weight files left behind
    assert not list(tmp_path.iterdir())
    server.calls.clear()
    gen.load_weights([("w", torch.ones(2))])
    assert [path for _, path in server.calls] == [
        "/pause", "/update_weight_version",  # unlabelled before anything can fail half-way
        "/start_weight_update", "/finish_weight_update", "/start_weight_update",  # the open one closed
        "/update_weights", "/finish_weight_update", "/reset_prefix_cache", "/resume"]
    assert not list(tmp_path.iterdir())  # the weight file is gone once the server has read it


def test_a_completion_without_a_weight_label_is_unlabelled_and_a_mixed_one_says_so():
    choice = {"token_ids": [5, 2], "finish_reason": "stop", "logprobs": {"content": [{"logprob": -1.0}, {"logprob": -0.5}]}}
    assert VLLMServerGenerator._completion(choice).weight_version is None
    spans = [{"version": "a@round-1", "start": 0, "end": 1}, {"version": "a@round-2", "start": 1, "end": 2}]
    assert VLLMServerGenerator._completion({**choice, "weight_versions": spans}).weight_version == "mixed:a@round-1,a@round-2"
    one = VLLMServerGenerator._completion({**choice, "weight_versions": spans[:1]})
    assert (one.weight_version, one.logprobs, one.finished) == ("a@round-1", [-1.0, -0.5], True)


def test_samples_from_weights_not_labelled_as_the_policy_are_refused_before_training(
        tiny_model_dir, prompts_file, tmp_path, monkeypatch):
    """The steps check every sample's weight label, whatever the engine (here transformers)."""
    from online_dpo.sampling.samplers import StaleSampleError
    from online_dpo.sampling.transformers_generator import HFGenerator

    label = HFGenerator.label_weights
    monkeypatch.setattr(HFGenerator, "label_weights", lambda self, version: label(self, version.replace("round-1", "round-0")))
    recipe = recipe_from_dict(tiny_recipe_dict(tiny_model_dir, prompts_file, tmp_path, **{"eval.every": 0}))
    with pytest.raises(StaleSampleError, match="drawn by weights '.*@round-0', not by the policy '.*@round-1'"):
        Run(recipe).execute()
    run = tmp_path / "tiny"
    assert (run / "round_1" / "sync.json").exists() and not (run / "round_2" / "samples.jsonl").exists()


def test_an_answer_that_is_not_json_is_named(serve, tmp_path):
    server = serve({("POST", "/inference/v1/generate"): (200, b"<html>a proxy page</html>", 0)})
    with pytest.raises(ServerError, match="scoring the probe answered with a body that is not JSON: .*proxy page"):
        client(server, tmp_path).score([1], [2])
