"""Stopping a run cleanly on request: a stop signal (SLURM's warning ahead of a time limit or a
preemption) or the run's own time budget (``preemption.max_wall_minutes``).

Why a flag and an agreement: a signal may reach only some ranks, and a rank that stops alone
hangs the others in their next collective. The handler therefore only records the request (it
never raises, so a signal that lands inside a checkpoint write lets the write finish and
publish); once per step every rank contributes its local request to one MAX all-reduce on
``parallel.device`` (folded into the step's loss reduction, megavlm.train.loop), and all ranks
act on the agreed value at the same step: finish it, save a complete checkpoint at it, and exit
with :data:`EXIT_PREEMPTED`. Re-running the same command resumes from that checkpoint bitwise.

The handlers span the whole run, not one stage: :func:`spanning_run` (around
megavlm.train.stages.run_stages) installs them before the first stage and keeps them between
stages, and each stage's :class:`StopRequests` starts from a request received before it (during
setup, or after the previous stage finished), so such a signal stops the next stage at its first
step with a checkpoint and exit 75 instead of killing the process the default way (a killed job
is not requeued).

Launchers learn the code through torchrun, which reports a worker's exit code only in its log
(its own code is 1): rank 0 also writes the code to the file named by ``$MEGAVLM_EXIT_FILE``
when it is set (launch/slurm.sbatch and launch/torchrun.sh set it and requeue / exit 75).
"""

from __future__ import annotations

import functools
import os
import signal
import time
from pathlib import Path
from typing import Callable, Optional

EXIT_PREEMPTED = 75
"""Exit code of a run stopped on request after saving (BSD EX_TEMPFAIL: "try again later")."""

EXIT_FILE_ENV = "MEGAVLM_EXIT_FILE"

NONE, WALL, SIGNAL = 0, 1, 2
"""Stop requests, ordered so that the MAX over ranks keeps the most specific reason."""
REASONS = {WALL: "time budget (preemption.max_wall_minutes)", SIGNAL: "stop signal"}


class Preempted(SystemExit):
    """Raised on every rank after the stop checkpoint is saved; exits the process with
    EXIT_PREEMPTED unless a caller handles it."""

    def __init__(self, stage: str, step: int, reason: str):
        super().__init__(EXIT_PREEMPTED)
        self.stage, self.step, self.reason = stage, step, reason

    def __str__(self) -> str:
        return (f"[{self.stage}] stopped at step {self.step} on {self.reason}; checkpoint saved, "
                f"exit {EXIT_PREEMPTED}: re-run the same command to resume")


class StopRequests:
    """This process's stop request: installed signal handlers plus a wall-clock budget.

    The budget counts from ``started_at`` (default: when this process started, so the stages of
    one job share one budget); ``clock`` (default time.time) is injectable for tests."""

    def __init__(self, signals: list[str], max_wall_minutes: Optional[float],
                 started_at: Optional[float] = None, clock: Callable[[], float] = time.time):
        self.signals = [getattr(signal, s) for s in signals]
        self.budget_s = None if max_wall_minutes is None else 60.0 * max_wall_minutes
        self.clock = clock
        self.t0 = process_start() if started_at is None else started_at
        self.received: Optional[int] = None
        self._previous: dict[int, object] = {}
        self._outer: Optional[StopRequests] = None

    def __enter__(self) -> "StopRequests":
        import threading

        if _active:  # inside a run-wide scope: a request it already holds is this one's too
            self._outer = _active[-1]
            self.received = self.received or self._outer.received
        _active.append(self)
        if threading.current_thread() is threading.main_thread():  # signal() works there only
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()
        if self in _active:
            _active.remove(self)

    def _handle(self, signum, frame) -> None:  # only a flag: never raise inside a save
        scope = self
        while scope is not None:  # the enclosing scopes keep it for the stages after this one
            scope.received = signum
            scope = scope._outer

    def local(self) -> int:
        """This rank's request: SIGNAL, WALL or NONE."""
        if self.received is not None:
            return SIGNAL
        if self.budget_s is not None and self.clock() - self.t0 >= self.budget_s:
            return WALL
        return NONE


_active: list[StopRequests] = []
"""The StopRequests scopes entered in this process, outermost first."""


def spanning_run(fn):
    """Decorate ``fn(run, ...)`` (megavlm.train.stages.run_stages) so that the stop signals of
    ``run.preemption.stop_signals`` are caught from its start to its end, between stages included."""

    @functools.wraps(fn)
    def wrapper(run, *args, **kwargs):
        with StopRequests(run.preemption.stop_signals, None):
            return fn(run, *args, **kwargs)

    return wrapper


def process_start() -> float:
    """This process's start (epoch seconds)."""
    import psutil

    return psutil.Process().create_time()


def report_exit_code(code: int, rank: int) -> None:
    """Rank 0 writes ``code`` to ``$MEGAVLM_EXIT_FILE`` (temporary name, then rename) if set."""
    target = os.environ.get(EXIT_FILE_ENV)
    if not target or rank != 0:
        return
    p = Path(target)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(f"{code}\n")
    tmp.replace(p)
