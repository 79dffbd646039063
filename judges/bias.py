"""Bias controls for pairwise judges: ask in both orders and treat disagreement as a tie."""

from __future__ import annotations

import threading

from judges.protocol import Judgment, Preference, Row
from judges.reliable import start_call

_SWAP = {Preference.FIRST: Preference.SECOND, Preference.SECOND: Preference.FIRST}


class BothOrders:
    """Judge (a, b) and (b, a). A judge with position bias answers "first" both times; that
    disagreement becomes a tie (or a failure), and the flip rate is recorded per round."""

    def __init__(self, judge, disagreement: str = "tie"):
        if disagreement not in ("tie", "failed"):
            raise ValueError(f"disagreement must be 'tie' or 'failed', got {disagreement!r}")
        self.inner = judge
        self.disagreement = Preference.TIE if disagreement == "tie" else Preference.FAILED
        self.compared = 0
        self.flipped = 0
        self._lock = threading.Lock()  # judged from several threads at once (judge.concurrency)

    @property
    def pointwise(self) -> bool:
        """A score does not depend on the order of anything: a pointwise judge behind BothOrders
        still ranks a prompt's samples by n scores, not by n(n-1) pairwise calls."""
        return bool(getattr(self.inner, "pointwise", False))

    @property
    def concurrency(self) -> int:
        return getattr(self.inner, "concurrency", 1)

    @property
    def calls_per_judgment(self) -> int:
        """Requests one judgment keeps in flight: both orders at once when the judge is concurrent."""
        return 2 if self.concurrency > 1 else 1

    def score_many(self, row: Row, completions: list[str]):
        return self.inner.score_many(row, completions)

    def prefetch_scores(self, items) -> None:
        self.inner.prefetch_scores(items)

    def close(self) -> None:
        if callable(getattr(self.inner, "close", None)):
            self.inner.close()

    def judge(self, row: Row, first: str, second: str) -> Judgment:
        if self.calls_per_judgment == 2:  # both orders in flight; the second is paid even if the first fails
            backward_call = start_call(self.inner.judge, row, second, first, name="judge-order")
            forward, backward = self.inner.judge(row, first, second), backward_call.result()
        else:  # one at a time: a failed first order spares the second call
            forward = self.inner.judge(row, first, second)
            backward = forward if forward.preference == Preference.FAILED else self.inner.judge(row, second, first)
        if forward.preference == Preference.FAILED:
            return forward
        if backward.preference == Preference.FAILED:
            return backward
        backward_as_forward = _SWAP.get(backward.preference, backward.preference)
        agree = backward_as_forward == forward.preference
        with self._lock:
            self.compared += 1
            self.flipped += not agree
        if agree:
            return forward
        return Judgment(self.disagreement,
                        f"order-dependent: {forward.preference.value} in order AB, "
                        f"{backward.preference.value} in order BA")

    def pop_stats(self) -> dict:
        with self._lock:
            stats = {"position_flip_rate": self.flipped / self.compared if self.compared else None}
            self.compared = self.flipped = 0
        return stats



def judgments_in_flight(judge, requests: int) -> int:
    """How many judgments to run at once so that `requests` bound the calls in flight (a
    BothOrders judgment sends both orders together)."""
    return max(1, requests // getattr(judge, "calls_per_judgment", 1))
