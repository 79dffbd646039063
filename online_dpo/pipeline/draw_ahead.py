"""Asynchronous online DPO: which policy samples each round, and when (generation.max_staleness).

With staleness s, round k's prompts are sampled by the policy of round max(0, k - 1 - s). The
schedule is fixed, so a run is as deterministic as a synchronous one and a resume after a kill
gives the same results; only the order of the steps in time changes, never the steps.

When the sampler holds the policy of round v (after round v's eval, or pi_0 at the start), it
draws every round that policy samples: round v + 1 + s (rounds 1 .. 1 + s for pi_0). Those rounds'
`sample` and `judge` steps run then, so their pairs are ready when their round comes:
- `Inline` runs them at once, in turn with the other steps (the in-process engine, several
  processes): the stale schedule without overlap.
- `Background` runs them in a thread while the trainer trains the rounds before (a `vllm serve`
  sampler, one process): the sampler's and the trainer's time overlap.
Before the next policy's checkpoint is written, the draws of the policy before it are finished
(`settle`): the weights they sample go from the sampler at the sync that follows, and a resume
from that checkpoint can no longer draw them. s = 0 draws nothing ahead: each `sample` step runs in
its own round, as in the synchronous loop.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class StaleSchedule:
    def __init__(self, staleness: int, rounds: int):
        self.staleness, self.rounds = staleness, rounds

    def sampler_round(self, k: int) -> int:
        """The policy round that samples round k's prompts (0: pi_0)."""
        return max(0, k - 1 - self.staleness)

    def drawn_by(self, v: int) -> list[int]:
        """The rounds that the policy of round v samples ahead of their turn."""
        if not self.staleness:
            return []
        return [k for k in range(1, self.rounds + 1) if self.sampler_round(k) == v]


DrawSteps = Callable[[int], None]  # runs one round's `sample` and `judge` steps (each once)


class Inline:
    overlaps = False

    def start(self, rounds: list[int], draw: DrawSteps) -> None:
        for k in rounds:
            draw(k)

    def wait(self, k: int) -> None:
        pass

    def settle(self) -> None:
        pass

    def close(self) -> None:
        pass


class Background:
    """One thread draws the rounds in order. A failure is kept and raised in the run's thread when
    it next waits (its round's turn, or the next checkpoint), so it stops the run with its own
    message; the thread is a daemon, so a run that stops for any reason does not hang on it. When
    the run stops (`close`), no further round's draw starts: a caller that goes on in the same
    process finds no thread writing into the run."""

    overlaps = True

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._pending: list[int] = []
        self._error: BaseException | None = None
        self._done = threading.Condition()
        self._closing = threading.Event()

    def start(self, rounds: list[int], draw: DrawSteps) -> None:
        self.settle()  # one policy's draws at a time: the sampler holds one set of weights
        if not rounds:
            return
        self._pending = list(rounds)

        def work():
            try:
                for k in rounds:
                    if self._closing.is_set():
                        with self._done:
                            self._pending = []
                            self._done.notify_all()
                        return
                    draw(k)
                    with self._done:
                        self._pending.remove(k)
                        self._done.notify_all()
            except BaseException as failure:  # noqa: BLE001 - re-raised in the run's thread
                with self._done:
                    self._error = failure
                    self._done.notify_all()

        self._thread = threading.Thread(target=work, name="draw-ahead", daemon=True)
        self._thread.start()

    def wait(self, k: int) -> None:
        """Until round k's draw (if it is in flight) is done."""
        with self._done:
            self._done.wait_for(lambda: k not in self._pending or self._error is not None)
        self._raise()

    def settle(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._raise()

    def close(self, timeout_s: float = 10.0) -> None:
        """The run is stopping (finished, or failed in its own thread): the round being drawn may
        end (its sampler and judge calls have their own timeouts; the sampler closes next), and no
        other starts. A failure of the thread's own is not raised over the run's."""
        self._closing.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            self._pending = []
            raise error


def build_draws(recipe, procs) -> Inline | Background:
    g = recipe.generation
    if g.max_staleness and g.backend == "vllm_server" and procs.world == 1:
        return Background()
    if g.max_staleness and procs.main:
        where = "several processes" if procs.world > 1 else f"generation.backend: {g.backend}"
        print(f"[online-dpo] generation.max_staleness: {g.max_staleness} with {where}: the stale schedule, "
              "drawn in turn with training (the overlap needs a vllm_server sampler and one process)", flush=True)
    return Inline()
