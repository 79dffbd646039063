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
import threading
import time
from collections.abc import Iterator

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


def server_retry_after(retry_state: RetryCallState) -> float | None:
    """The pause the failed attempt's server asked for (an exception's `retry_after`), at most
    MAX_RETRY_AFTER_S; None when it asked for none."""
    error = retry_state.outcome.exception() if retry_state.outcome else None
    retry_after = getattr(error, "retry_after", None)
    return None if retry_after is None else min(float(retry_after), MAX_RETRY_AFTER_S)


class Backoff(wait_base):
    """Before retry n: backoff_s * 2**(n-1), or the server's Retry-After if longer (an exception's
    `retry_after`, at most MAX_RETRY_AFTER_S), plus up to `jitter` of that at random so clients
    throttled together do not retry together."""

    def __init__(self, backoff_s: float, jitter: float, rng: random.Random):
        self.backoff_s, self.jitter, self.rng = backoff_s, jitter, rng

    def __call__(self, retry_state: RetryCallState) -> float:
        wait = self.backoff_s * 2 ** (retry_state.attempt_number - 1)
        retry_after = server_retry_after(retry_state)
        if retry_after is not None:
            wait = max(wait, retry_after)
        return wait * (1 + self.rng.uniform(0, self.jitter))


def _retryable(error: BaseException) -> bool:
    # Anything else a judge raises (a crash, a timeout, garbage, HTTP 429/5xx) may pass on retry;
    # a KeyboardInterrupt is not a judge fault.
    return isinstance(error, Exception) and not isinstance(error, (JudgeConfigError, JudgeRequestRejected))


class ReliableJudge:
    """Wraps a pairwise judge (and its `score`, if it is also pointwise). The one retry layer:
    each call gets `retries` more attempts after the first, backing off from `backoff_s`, each
    attempt bounded by `timeout_s`. `sleep` is injectable for tests.

    Safe to call from `concurrency` threads at once (online_dpo/pipeline/pair_selection.py:
    `judge_prompts`): counters are locked, and a server's Retry-After pauses every thread, not
    only the one that was told, so a throttled server is not hit again by the others meanwhile."""

    def __init__(self, inner, *, fingerprint: str, retries: int = 2, timeout_s: float | None = None,
                 backoff_s: float = 0.5, cache: JsonlStore | None = None, sleep=time.sleep,
                 jitter: float = 0.1, concurrency: int = 1):
        self.inner = inner
        self.fingerprint = fingerprint
        self.retries = retries
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.cache = cache if cache is not None else JsonlStore(None)
        self.sleep = sleep
        self.concurrency = concurrency
        # Its own generator: jitter must not move the run's seeded `random` stream.
        self.wait = Backoff(backoff_s, jitter, random.Random())
        self.calls = 0
        self.retried = 0
        self.cache_hits = 0
        self._lock = threading.Lock()
        # A server's Retry-After: time.monotonic() before which no other thread sends a call (the
        # thread that was told waits in its own back-off).
        self._paused_until, self._paused_by = 0.0, None
        self._prefetched: set[str] = set()  # keys scored by prefetch_scores, not yet read

    @property
    def pointwise(self) -> bool:
        return callable(getattr(self.inner, "score", None))

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    def _call(self, fn, *args):
        self._count("calls")
        pause = self._paused_until - time.monotonic()
        if pause > 0 and self._paused_by != threading.get_ident():
            self.sleep(pause)
        if not self.timeout_s:
            return fn(*args)
        # A thread of its own per call: a stuck call keeps its thread, and no other call waits for it.
        future = start_call(fn, *args)
        try:
            return future.result(timeout=self.timeout_s)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"no answer within {self.timeout_s:g}s") from None

    def _pause_everyone(self, retry_state: RetryCallState) -> None:
        retry_after = server_retry_after(retry_state)
        if retry_after is not None:
            until = time.monotonic() + retry_after
            with self._lock:
                if until > self._paused_until:
                    self._paused_until, self._paused_by = until, threading.get_ident()

    def _with_retries(self, fn, validate, *args):
        """(answer, None) on success, else (None, reason of the last failure). A JudgeConfigError
        is raised at once: no retry can fix it, so the run stops with its message."""

        def count_retry(state: RetryCallState) -> None:
            self._count("retried")
            self._pause_everyone(state)

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
            self._count("cache_hits")
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
        with self._lock:
            fresh = self._prefetched.intersection(keys)  # paid for by this round's prefetch
            self._prefetched.difference_update(fresh)
            self.cache_hits += sum(v is not None and k not in fresh for k, (v, _) in zip(keys, results, strict=True))
        todo = [i for i, (v, _) in enumerate(results) if v is None]
        if todo:
            # None for one sample: the judge could not score it (`no_score_reason` says why).
            values, reason = self._with_retries(batch_fn, self._valid_batch(len(todo)),
                                                [(row, completions[i]) for i in todo])
            no_score = getattr(self.inner, "no_score_reason", "the judge gave no score")
            for n, i in enumerate(todo):
                if values is None:
                    results[i] = (None, reason)
                elif values[n] is None:
                    results[i] = (None, no_score)
                else:
                    results[i] = (values[n], "")
                    self.cache.put(keys[i], values[n])
        return results

    @staticmethod
    def _valid_batch(size: int):
        def validate(values):
            if not isinstance(values, (list, tuple)) or len(values) != size:
                raise TypeError(f"score_batch() returned {values!r}, not {size} scores")
            return [None if v is None else _valid_score(v) for v in values]
        return validate

    def prefetch_scores(self, items: list[tuple[Row, str]]) -> None:
        """Score every (row, completion) not cached yet in one batched call across prompts (a reward
        model sorts them by length and fills each forward), so each prompt's `score_many` finds
        them (not counted as cache hits: this round paid for them). A judge without `score_batch`
        is left alone; a failed call only means each prompt is scored on its own, with its retries."""
        batch_fn = getattr(self.inner, "score_batch", None)
        if batch_fn is None:
            return
        pending: dict[str, tuple[Row, str]] = {}
        for row, completion in items:
            key = cache_key(self.fingerprint, "score", row, completion)
            if self.cache.get(key) is None:
                pending.setdefault(key, (row, completion))
        if not pending:
            return
        values, _ = self._with_retries(batch_fn, self._valid_batch(len(pending)), list(pending.values()))
        scored = [(key, value) for key, value in zip(pending, values or [], strict=False) if value is not None]
        self.cache.put_many(scored)
        with self._lock:
            self._prefetched.update(key for key, _ in scored)

    def judge(self, row: Row, first: str, second: str) -> Judgment:
        key = cache_key(self.fingerprint, "judge", row, first, second)
        cached = self.cache.get(key)
        if cached is not None:
            self._count("cache_hits")
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
        if callable(getattr(self.inner, "close", None)):
            self.inner.close()

    def pop_stats(self) -> dict:
        with self._lock:
            stats = {"judge_calls": self.calls, "judge_retries": self.retried, "judge_cache_hits": self.cache_hits,
                     "judge_concurrency": self.concurrency}
            self.calls = self.retried = self.cache_hits = 0
        return stats


def map_in_order(fn, items: list, concurrency: int = 1) -> Iterator:
    """fn(item) for each item, yielded in the items' order, with up to `concurrency` running at
    once (threads: judge calls wait on a server, not on this process). Serial when 1, and lazy:
    item i starts only when result i - 1 has been taken. If the consumer stops (or fn raises),
    items not yet started are cancelled and those in flight are waited for."""
    if concurrency <= 1:
        yield from map(fn, items)
        return
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="judge")
    try:
        futures = [pool.submit(fn, item) for item in items]
        for future in futures:
            yield future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def start_call(fn, *args, name: str = "judge-call") -> concurrent.futures.Future:
    """fn(*args) on a thread of its own, a daemon: a call that never returns holds no one up."""
    future: concurrent.futures.Future = concurrent.futures.Future()
    threading.Thread(target=_run_into, args=(future, fn, args), daemon=True, name=name).start()
    return future


def _run_into(future: concurrent.futures.Future, fn, args) -> None:
    try:
        future.set_result(fn(*args))
    except BaseException as error:  # noqa: BLE001 - handed to the waiting caller
        future.set_exception(error)


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
