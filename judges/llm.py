"""LLM-as-judge: a prompted pairwise judgment with a strict verdict parse.

Backends: any OpenAI-compatible chat endpoint (`backend: http`, e.g. `vllm serve`), or a local
model in-process (`backend: transformers` or `backend: vllm`). The API key is read from the
environment variable named by `api_key_env` at call time; it is never stored in the judge's
config, the run directory, logs or error messages.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from typing import Any

from judges.protocol import Judgment, Preference, Row
from judges.rules import prompt_text

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
    """POST {base_url}/chat/completions, OpenAI-style."""

    def __init__(self, base_url: str, model: str, api_key_env: str | None, timeout_s: float,
                 temperature: float, max_tokens: int, extra_body: dict | None):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s
        self.body = {"temperature": temperature, "max_tokens": max_tokens, **(extra_body or {})}

    def _key(self) -> str | None:
        if not self.api_key_env:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise RuntimeError(f"environment variable {self.api_key_env} (judge api_key_env) is not set")
        return key

    def complete(self, messages: list[dict]) -> str:
        key = self._key()
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = json.dumps({"model": self.model, "messages": messages, **self.body}).encode()
        request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            detail = _redact(e.read()[:200].decode(errors="replace"), key)
            kind = "rate limited" if e.code == 429 else "server error" if e.code >= 500 else "error"
            raise RuntimeError(f"HTTP {e.code} ({kind}) from {self.url}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ConnectionError(f"cannot reach {self.url}: {_redact(str(reason), key)}") from None
        try:
            return json.loads(raw)["choices"][0]["message"]["content"]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError):
            raise ValueError(f"malformed response from {self.url}: {_redact(raw[:120].decode(errors='replace'), key)!r}") from None


def _redact(text: str, key: str | None) -> str:
    return text.replace(key, "***") if key else text


class LocalBackend:
    """A local model in-process, greedy decoding with its own chat template."""

    def __init__(self, engine: str, model: str, max_tokens: int):
        from online_dpo.models import resolve_model_path

        self.engine = engine
        self.max_tokens = max_tokens
        path = resolve_model_path(model)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if engine == "vllm":
            from online_dpo.generation.vllm_engine import configure_vllm_env

            configure_vllm_env(kv_cache_gib=1)
            from vllm import LLM

            self.llm = LLM(model=str(path), dtype="float32", enforce_eager=True, max_model_len=2048)
        else:
            import torch
            from transformers import AutoModelForCausalLM

            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def complete(self, messages: list[dict]) -> str:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
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
    """Pairwise. `template` has {prompt}, {first} and {second}; the reply must be A, B or TIE."""

    def __init__(self, backend: str, model: str, template: str = DEFAULT_TEMPLATE,
                 base_url: str | None = None, api_key_env: str | None = None,
                 timeout_s: float = 60.0, temperature: float = 0.0, max_tokens: int = 8,
                 system_prompt: str | None = None, extra_body: dict[str, Any] | None = None):
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
        elif backend in ("transformers", "vllm"):
            self.backend = LocalBackend(backend, model, max_tokens)
        else:
            raise ValueError(f"LLMJudge backend must be http, transformers or vllm, got {backend!r}")

    def judge(self, row: Row, first: str, second: str) -> Judgment:
        content = self.template.format(prompt=prompt_text(row), first=first, second=second)
        messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else [])
        reply = self.backend.complete(messages + [{"role": "user", "content": content}])
        return Judgment(parse_verdict(reply), f"LLM verdict {reply.strip()[:40]!r}")

    def close(self) -> None:
        if hasattr(self.backend, "close"):
            self.backend.close()
