"""LLM-as-judge: a prompted pairwise judgment with a strict verdict parse.

Backends: any OpenAI-compatible chat endpoint (`backend: http`, e.g. `vllm serve`), or a local
model in-process (`backend: transformers` or `backend: vllm`). The API key is read from the
environment variable named by `api_key_env` at call time (and checked when the judge is built);
it is never stored in the judge's config, the run directory, logs or error messages.
"""

from __future__ import annotations

import datetime
import email.utils
import os
import re
from typing import Any

import httpx

from judges.protocol import (
    JudgeConfigError,
    JudgeRequestRejected,
    JudgeRetryableError,
    Judgment,
    Preference,
    Row,
)
from judges.rules import conversation_text
from online_dpo.net import pooled_limits

DEFAULT_TEMPLATE = (
    "Which answer to the question is better: more helpful, correct and concise?\n\n"
    "Question: {prompt}\n\nAnswer A: {first}\n\nAnswer B: {second}\n\n"
    "Reply with exactly one word: A, B, or TIE."
)
_VERDICT = re.compile(r"^\s*(?:verdict\s*:\s*)?(A|B|TIE)\s*[.!]?\s*$", re.IGNORECASE)
_PREFERENCE = {"A": Preference.FIRST, "B": Preference.SECOND, "TIE": Preference.TIE}


class VerdictParseError(ValueError):
    pass


def parse_verdict(reply: str) -> Preference:
    """Strict: the whole reply (or its last line) must be A, B or TIE, optionally "Verdict: X"."""
    lines = [line for line in reply.strip().splitlines() if line.strip()]
    for candidate in ([reply] + lines[-1:]):
        match = _VERDICT.match(candidate)
        if match:
            return _PREFERENCE[match.group(1).upper()]
    raise VerdictParseError(f"unparseable verdict {reply[:80]!r} (expected A, B or TIE)")


class HTTPChatBackend:
    """POST {base_url}/chat/completions, OpenAI-style, over one pooled connection per backend.

    One attempt per call: `ReliableJudge` is the one retry layer. Faults are typed for it:
    HTTP 429/5xx, a refused connection or a timeout raise JudgeRetryableError (with the server's
    Retry-After); 401/403/404 and a missing key raise JudgeConfigError (the run stops); other 4xx
    (400: e.g. a prompt over the judge's context) raise JudgeRequestRejected (that pair fails).
    """

    def __init__(self, base_url: str, model: str, api_key_env: str | None, timeout_s: float,
                 temperature: float, max_tokens: int, extra_body: dict | None):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = httpx.Timeout(timeout_s)
        self.body = {"temperature": temperature, "max_tokens": max_tokens, **(extra_body or {})}
        self.client = httpx.Client(timeout=self.timeout, limits=pooled_limits())

    def _key(self) -> str | None:
        if not self.api_key_env:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise JudgeConfigError(f"environment variable {self.api_key_env} (judge api_key_env) is not set")
        return key

    def complete(self, messages: list[dict]) -> str:
        key = self._key()  # read per call, so a rotated key is picked up
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        payload = {"model": self.model, "messages": messages, **self.body}
        try:
            response = self.client.post(self.url, json=payload, headers=headers, timeout=self.timeout)
        except httpx.TimeoutException as e:
            raise JudgeRetryableError(f"timed out ({type(e).__name__}) after {self.timeout.read:g}s "
                                      f"waiting for {self.url}") from None
        except httpx.TransportError as e:
            raise JudgeRetryableError(f"cannot reach {self.url}: {_redact(str(e), key)}") from None
        if response.status_code >= 400:
            raise _http_error(response, self.url, key)
        try:
            return response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ValueError(f"malformed response from {self.url}: "
                             f"{_redact(response.text[:120], key)!r}") from None

    def close(self) -> None:
        self.client.close()


def _http_error(response: httpx.Response, url: str, key: str | None) -> Exception:
    code = response.status_code
    detail = _redact(response.text[:200], key)
    if code == 429 or code >= 500 or code in (408, 409):
        kind = "rate limited" if code == 429 else "server error" if code >= 500 else "try again"
        return JudgeRetryableError(f"HTTP {code} ({kind}) from {url}: {detail}",
                                   retry_after=_retry_after(response.headers.get("Retry-After")))
    if code in (401, 403, 404):
        why = {401: "unauthorized: check the API key", 403: "forbidden: check the API key's access",
               404: "not found: check base_url and model"}[code]
        return JudgeConfigError(f"HTTP {code} ({why}) from {url}: {detail}")
    return JudgeRequestRejected(f"HTTP {code} (request rejected) from {url}: {detail}")


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds, or as an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds())


def _redact(text: str, key: str | None) -> str:
    return text.replace(key, "***") if key else text


class LocalBackend:
    """A local model in-process, greedy decoding with its own chat template."""

    def __init__(self, engine: str, model: str, max_tokens: int, max_model_len: int,
                 revision: str | None = None):
        from online_dpo.storage.model_files import resolve_model_path

        self.engine = engine
        self.max_tokens, self.max_model_len = max_tokens, max_model_len
        path = resolve_model_path(model, revision)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if engine == "vllm":
            from online_dpo.sampling.vllm_engine import configure_vllm_env

            configure_vllm_env(kv_cache_gib=1)
            from vllm import LLM

            self.llm = LLM(model=str(path), dtype="float32", enforce_eager=True,
                           max_model_len=max_model_len)
        else:
            import torch
            from transformers import AutoModelForCausalLM

            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def complete(self, messages: list[dict]) -> str:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) + self.max_tokens > self.max_model_len:  # a judge failure, not an engine error
            raise ValueError(f"LLMJudge: the judge prompt has {len(ids)} tokens; with max_tokens "
                             f"{self.max_tokens} it exceeds max_model_len {self.max_model_len}")
        if self.engine == "vllm":
            from vllm import SamplingParams
            from vllm.inputs import TokensPrompt

            params = SamplingParams(temperature=0.0, max_tokens=self.max_tokens)
            return self.llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)[0].outputs[0].text
        import torch

        with torch.no_grad():
            out = self.model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=self.max_tokens,
                                      pad_token_id=self.tokenizer.eos_token_id)
        return self.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)

    def close(self) -> None:
        if self.engine == "vllm" and getattr(self, "llm", None) is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None


class LLMJudge:
    """Pairwise. `template` has {prompt}, {first} and {second}; the reply must be A, B or TIE.

    `concurrency`: prompts judged at once by default (judge.concurrency overrides it). A server
    batches concurrent requests, so over HTTP 16 are in flight; a model in this process takes
    one request at a time."""

    HTTP_CONCURRENCY = 16

    def __init__(self, backend: str, model: str, template: str = DEFAULT_TEMPLATE,
                 base_url: str | None = None, api_key_env: str | None = None,
                 timeout_s: float = 60.0, temperature: float = 0.0, max_tokens: int = 8,
                 system_prompt: str | None = None, extra_body: dict[str, Any] | None = None,
                 max_model_len: int = 4096, revision: str | None = None):
        for field in ("{prompt}", "{first}", "{second}"):
            if field not in template:
                raise ValueError(f"LLMJudge template lacks {field}")
        self.template = template
        self.system_prompt = system_prompt
        if backend == "http":
            if not base_url:
                raise ValueError("LLMJudge backend 'http' needs base_url")
            self.backend = HTTPChatBackend(base_url, model, api_key_env, timeout_s, temperature,
                                           max_tokens, extra_body)
            self.backend._key()  # a missing key stops the run before any model loads
            self.concurrency = self.HTTP_CONCURRENCY
        elif backend in ("transformers", "vllm"):
            self.backend = LocalBackend(backend, model, max_tokens, max_model_len, revision)
            self.concurrency = 1
        else:
            raise ValueError(f"LLMJudge backend must be http, transformers or vllm, got {backend!r}")

    def judge(self, row: Row, first: str, second: str) -> Judgment:
        content = self.template.format(prompt=conversation_text(row), first=first, second=second)
        messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else [])
        reply = self.backend.complete(messages + [{"role": "user", "content": content}])
        return Judgment(parse_verdict(reply), f"LLM verdict {reply.strip()[:40]!r}")

    def close(self) -> None:
        if hasattr(self.backend, "close"):
            self.backend.close()
