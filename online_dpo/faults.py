"""Deterministic kill points, so tests can SIGKILL a real run at an exact step and resume it.

`ONLINE_DPO_KILL_AT=round_2/train_step_1` kills the process the moment that point is reached.
Unset (the normal case), every call is a no-op string comparison. In a sweep, every cell's process
inherits the variable; `ONLINE_DPO_KILL_CELL=<cell name>` keeps it for that cell alone (`cell_env`).
"""

from __future__ import annotations

import os
import signal


def maybe_kill(point: str) -> None:
    if os.environ.get("ONLINE_DPO_KILL_AT") == point:
        os.kill(os.getpid(), signal.SIGKILL)


def cell_env(cell_name: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a sweep cell's process: the kill point is dropped for every cell but
    `ONLINE_DPO_KILL_CELL` when that is set."""
    env = dict(os.environ if env is None else env)
    only = env.get("ONLINE_DPO_KILL_CELL")
    if only is not None and only != cell_name:
        env.pop("ONLINE_DPO_KILL_AT", None)
    return env
