"""Majority vote over several judges, or over k samples of one stochastic judge."""

from __future__ import annotations

from collections import Counter
from typing import Any

from judges.protocol import JudgeConfigError, Judgment, Preference, Row


class MajorityVote:
    """A pairwise judge whose answer is the majority of its voters' answers.

    Recipe kwargs: `judges: [{target: ..., kwargs: {...}}, ...]`, or `judge: {target, kwargs}`
    with `samples: k` to ask one stochastic judge k times. A side wins only with more than
    `quorum` of the valid (non-failed) votes; otherwise the answer is a tie. Failed votes are
    not counted; if every vote failed, the answer is a failure.
    """

    def __init__(self, judges: list[dict[str, Any]] | None = None, judge: dict[str, Any] | None = None,
                 samples: int = 1, quorum: float = 0.5):
        from judges.loading import JudgeLoadError, build_judge

        if (judges is None) == (judge is None):
            raise JudgeLoadError("MajorityVote takes exactly one of `judges` (a list) or `judge`")
        specs = judges if judges is not None else [judge] * samples
        if judge is not None and samples < 2:
            raise JudgeLoadError("MajorityVote over one judge needs samples >= 2")
        if not 0 <= quorum < 1:
            raise JudgeLoadError(f"MajorityVote quorum must be in [0, 1), got {quorum}")
        for spec in specs:
            if not isinstance(spec, dict) or "target" not in spec:
                raise JudgeLoadError(f"MajorityVote voter {spec!r} needs a `target`")
        built: dict[int, Any] = {}
        # The same spec k times means k calls to *one* judge object (k samples of it).
        for s in specs:
            if id(s) not in built:
                built[id(s)] = build_judge(s["target"], s.get("kwargs", {}))
        self.voters = [built[id(s)] for s in specs]
        self.quorum = quorum
        self.decisions = 0
        self.agreement_sum = 0.0
        self.unanimous = 0

    def judge(self, row: Row, first: str, second: str) -> Judgment:
        votes = []
        for voter in self.voters:
            try:
                answer = voter.judge(row, first, second)
            except JudgeConfigError:
                raise  # a missing key or refused credential stops the run, not one vote
            except Exception as e:  # noqa: BLE001 - one broken voter is one failed vote
                answer = Judgment(Preference.FAILED, f"{type(e).__name__}: {e}")
            votes.append(answer.preference if isinstance(answer, Judgment) else Preference.FAILED)
        valid = [v for v in votes if v != Preference.FAILED]
        tally = ", ".join(f"{p.value}={n}" for p, n in Counter(votes).items())
        if not valid:
            return Judgment(Preference.FAILED, f"every vote failed ({tally})")
        top, count = Counter(valid).most_common(1)[0]
        self.decisions += 1
        self.agreement_sum += count / len(valid)
        self.unanimous += count == len(valid)
        if count / len(valid) > self.quorum and top != Preference.TIE:
            return Judgment(top, f"majority {count}/{len(valid)} ({tally})")
        return Judgment(Preference.TIE, f"no majority ({tally})")

    def pop_stats(self) -> dict:
        n = self.decisions
        stats = {"vote_agreement": self.agreement_sum / n if n else None,
                 "vote_unanimous_rate": self.unanimous / n if n else None}
        self.decisions, self.agreement_sum, self.unanimous = 0, 0.0, 0
        return stats
