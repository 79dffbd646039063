"""Fault tolerance for any judge: timeouts, bounded retries with backoff, answer validation,
and a persistent cache, so one flaky judge call never kills a run or gets paid for twice.

A call that still fails after its retries becomes a failed judgment (or a missing score) with the
reason; the pair is dropped and counted by the round, which stops only past the recipe's
`judge.max_failure_rate`.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import math
import threading
import time
from pathlib import Path
from typing import Any

from judges.protocol import Judgment, Preference, Row


class JudgeCache:
    """Successful answers, appended one line at a time so a killed run keeps what it paid for."""

    def __init__(self, path: Path | None):
        self.path = path
        self._lock = threading.Lock()
        self._data: dict[str, Any] = {}
        if path is not None and path.exists():
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line from a kill mid-write
                self._data[entry["key"]] = entry["value"]

    def get(self, key: str) -> Any:
        return self._data.get(key)

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self._data[key] = value
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a") as f:
                    f.write(json.dumps({"key": key, "value": value}) + "\n")

    def __len__(self) -> int:
        return len(self._data)


def cache_key(fingerprint: str, kind: str, row: Row, *texts: str) -> str:
    payload = json.dumps([fingerprint, kind, row, texts], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


class ReliableJudge:
    """Wraps a pairwise judge (and its `score`, if it is also pointwise)."""

    def __init__(self, inner, *, fingerprint: str, retries: int = 2, timeout_s: float | None = None,
                 backoff_s: float = 0.5, cache: JudgeCache | None = None, sleep=time.sleep):
        self.inner = inner
        self.fingerprint = fingerprint
        self.retries = retries
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.cache = cache if cache is not None else JudgeCache(None)
        self.sleep = sleep
        self.calls = 0
        self.retried = 0
        self.cache_hits = 0
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1) if timeout_s else None

    @property
    def pointwise(self) -> bool:
        return callable(getattr(self.inner, "score", None))

    def _call(self, fn, *args):
        self.calls += 1
        if self._pool is None:
            return fn(*args)
        future = self._pool.submit(fn, *args)
        try:
            return future.result(timeout=self.timeout_s)
        except concurrent.futures.TimeoutError:
            # The stuck call keeps its thread; a fresh pool lets the retry run right away.
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
            raise TimeoutError(f"no answer within {self.timeout_s:g}s") from None

    def _with_retries(self, fn, validate, *args):
        """(answer, None) on success, else (None, reason of the last failure)."""
        reason = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self.retried += 1
                self.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                return validate(self._call(fn, *args)), None
            except Exception as e:  # noqa: BLE001 - any judge fault is retried, then recorded
                reason = f"{type(e).__name__}: {e}"
        return None, f"failed after {self.retries + 1} attempts: {reason}"

    def score(self, row: Row, completion: str) -> tuple[float | None, str]:
        key = cache_key(self.fingerprint, "score", row, completion)
        cached = self.cache.get(key)
        if cached is not None:
            self.cache_hits += 1
            return cached, ""
        value, reason = self._with_retries(self.inner.score, _valid_score, row, completion)
        if value is not None:
            self.cache.put(key, value)
        return value, reason or ""

    def score_many(self, row: Row, completions: list[str]) -> list[tuple[float | None, str]]:
        """Scores for several completions of one prompt; one batched call when the judge has
        `score_batch` (a reward model), else one call each."""
        batch_fn = getattr(self.inner, "score_batch", None)
        if batch_fn is None:
            return [self.score(row, c) for c in completions]
        keys = [cache_key(self.fingerprint, "score", row, c) for c in completions]
        results: list[tuple[float | None, str]] = [(self.cache.get(k), "") for k in keys]
        self.cache_hits += sum(v is not None for v, _ in results)
        todo = [i for i, (v, _) in enumerate(results) if v is None]
        if todo:
            def validate(values):
                if not isinstance(values, (list, tuple)) or len(values) != len(todo):
                    raise TypeError(f"score_batch() returned {values!r}, not {len(todo)} scores")
                return [_valid_score(v) for v in values]

            values, reason = self._with_retries(batch_fn, validate, [(row, completions[i]) for i in todo])
            for n, i in enumerate(todo):
                if values is None:
                    results[i] = (None, reason)
                else:
                    results[i] = (values[n], "")
                    self.cache.put(keys[i], values[n])
        return results

    def judge(self, row: Row, first: str, second: str) -> Judgment:
        key = cache_key(self.fingerprint, "judge", row, first, second)
        cached = self.cache.get(key)
        if cached is not None:
            self.cache_hits += 1
            return Judgment(Preference(cached["preference"]), cached["reason"],
                            cached.get("first_score"), cached.get("second_score"))
        answer, reason = self._with_retries(self.inner.judge, _valid_judgment, row, first, second)
        if answer is None:
            return Judgment(Preference.FAILED, reason)
        if answer.preference != Preference.FAILED:
            self.cache.put(key, {"preference": answer.preference.value, "reason": answer.reason,
                                 "first_score": answer.first_score, "second_score": answer.second_score})
        return answer

    def pop_stats(self) -> dict:
        stats = {"judge_calls": self.calls, "judge_retries": self.retried, "judge_cache_hits": self.cache_hits}
        self.calls = self.retried = self.cache_hits = 0
        return stats


def _valid_score(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"score() returned {type(value).__name__} {value!r}, not a number")
    if not math.isfinite(value):
        raise ValueError(f"score() returned non-finite {value!r}")
    return float(value)


def _valid_judgment(value) -> Judgment:
    if not isinstance(value, Judgment):
        raise TypeError(f"judge() returned {type(value).__name__} {value!r}, not a Judgment")
    return value
