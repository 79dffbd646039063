"""Fault tolerance for any judge: timeouts, bounded retries with backoff, answer validation,
and a persistent cache, so one flaky judge call never kills a run or gets paid for twice.

A call that still fails after its retries becomes a failed judgment (or a missing score) with the
reason; the pair is dropped and counted by the round, which stops only past the recipe's
`judge.max_failure_rate`. A `JudgeConfigError` (a missing API key, a refused credential) is never
retried: it stops the run with its message. A `JudgeRequestRejected` (HTTP 400) fails its call at
once, and a `JudgeRetryableError`'s `retry_after` lengthens the wait before the next attempt.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import math
import random
import time

from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt
from tenacity.wait import wait_base

from judges.protocol import (
    JudgeConfigError,
    JudgeRequestRejected,
    Judgment,
    Preference,
    Row,
)
from online_dpo.storage.jsonl_store import JsonlStore

# Successful answers, appended one line at a time so a killed run keeps what it paid for.
JudgeCache = JsonlStore

# A server asking for a longer pause than this gets this: past it the call fails after its
# retries (a dropped pair) instead of stalling the whole run for as long as the server says.
MAX_RETRY_AFTER_S = 60.0


def cache_key(fingerprint: str, kind: str, row: Row, *texts: str) -> str:
    payload = json.dumps([fingerprint, kind, row, texts], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


class Backoff(wait_base):
    """Before retry n: backoff_s * 2**(n-1), or the server's Retry-After if longer (an exception's
    `retry_after`, at most MAX_RETRY_AFTER_S), plus up to `jitter` of that at random so clients
    throttled together do not retry together."""

    def __init__(self, backoff_s: float, jitter: float, rng: random.Random):
        self.backoff_s, self.jitter, self.rng = backoff_s, jitter, rng

    def __call__(self, retry_state: RetryCallState) -> float:
        wait = self.backoff_s * 2 ** (retry_state.attempt_number - 1)
        error = retry_state.outcome.exception() if retry_state.outcome else None
        retry_after = getattr(error, "retry_after", None)
        if retry_after is not None:
            wait = max(wait, min(float(retry_after), MAX_RETRY_AFTER_S))
        return wait * (1 + self.rng.uniform(0, self.jitter))


def _retryable(error: BaseException) -> bool:
    # Anything else a judge raises (a crash, a timeout, garbage, HTTP 429/5xx) may pass on retry;
    # a KeyboardInterrupt is not a judge fault.
    return isinstance(error, Exception) and not isinstance(error, (JudgeConfigError, JudgeRequestRejected))


class ReliableJudge:
    """Wraps a pairwise judge (and its `score`, if it is also pointwise). The one retry layer:
    each call gets `retries` more attempts after the first, backing off from `backoff_s`, each
    attempt bounded by `timeout_s`. `sleep` is injectable for tests."""

    def __init__(self, inner, *, fingerprint: str, retries: int = 2, timeout_s: float | None = None,
                 backoff_s: float = 0.5, cache: JsonlStore | None = None, sleep=time.sleep,
                 jitter: float = 0.1):
        self.inner = inner
        self.fingerprint = fingerprint
        self.retries = retries
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.cache = cache if cache is not None else JsonlStore(None)
        self.sleep = sleep
        # Its own generator: jitter must not move the run's seeded `random` stream.
        self.wait = Backoff(backoff_s, jitter, random.Random())
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
        """(answer, None) on success, else (None, reason of the last failure). A JudgeConfigError
        is raised at once: no retry can fix it, so the run stops with its message."""

        def count_retry(_state: RetryCallState) -> None:
            self.retried += 1

        retrying = Retrying(stop=stop_after_attempt(self.retries + 1), wait=self.wait,
                            retry=retry_if_exception(_retryable), sleep=self.sleep,
                            before_sleep=count_retry, reraise=True)
        try:
            for attempt in retrying:
                with attempt:
                    answer = validate(self._call(fn, *args))
            return answer, None
        except JudgeConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - any other judge fault is recorded, never fatal
            attempts = retrying.statistics.get("attempt_number", 1)
            why = "not retryable" if isinstance(e, JudgeRequestRejected) else \
                f"failed after {attempts} attempts"
            return None, f"{why}: {type(e).__name__}: {e}"

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

    def close(self) -> None:
        """Release the judge's resources (an HTTP judge's connection pool)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if callable(getattr(self.inner, "close", None)):
            self.inner.close()

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
