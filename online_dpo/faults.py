"""Deterministic kill points, so tests can SIGKILL a real run at an exact step and resume it.

`ONLINE_DPO_KILL_AT=round_2/train_step_1` kills the process the moment that point is reached.
Unset (the normal case), every call is a no-op string comparison.
"""

from __future__ import annotations

import os
import signal


def maybe_kill(point: str) -> None:
    if os.environ.get("ONLINE_DPO_KILL_AT") == point:
        os.kill(os.getpid(), signal.SIGKILL)
