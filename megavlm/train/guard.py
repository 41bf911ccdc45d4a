"""The loss-spike and NaN guard: what a step with a non-finite loss or gradient norm, or a loss
spike, does to the run (``guard.on_nonfinite``, ``guard.spike_factor`` / ``spike_window`` /
``on_spike``).

Every decision is made from globally reduced values — the step's mean loss (all-reduced over
data parallel, broadcast over pipeline stages) and megatron's global gradient norm — so every
rank decides the same at the same step and a skipped update is skipped everywhere.

* The loss is judged right after forward-backward, before the optimizer runs: a skipped step
  never calls ``optimizer.step()``.
* The gradient norm is judged inside ``optimizer.step()``, after megatron computed it and before
  it clips or updates anything (:func:`guard_grad_norm` wraps the optimizer's ``get_grad_norm``);
  a non-finite norm raises :class:`NonFiniteGradNorm` there, with no parameter touched. (megatron
  DDP's own ``check_for_nan_in_grad`` raises a bare error instead; the trainer turns it off.)
* A skipped step still counts, as in Megatron: the LR schedule and the data position advance,
  the metrics line says ``"skipped": true`` with the reason, and resuming reproduces it.
* ``stop`` raises :class:`TrainingDiverged` before anything of the bad step is saved, so the
  newest checkpoint is the last good one; the message names stage, step and the quantity.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Optional


class TrainingDiverged(SystemExit):
    """The guard stopped the run: uncaught, Python prints the one-line message to stderr and the
    process exits with status 1 (on every rank: the decision is global)."""

    def __str__(self) -> str:
        return str(self.code)


class NonFiniteGradNorm(RuntimeError):
    """Raised from inside optimizer.step() when the global gradient norm is NaN/Inf."""

    def __init__(self, value: float):
        super().__init__(f"grad_norm={value}")
        self.value = value


def guard_grad_norm(optimizer) -> None:
    """Make ``optimizer.step()`` raise NonFiniteGradNorm before clipping/updating when megatron's
    global gradient norm is not finite (every rank gets the same norm, so every rank raises)."""
    inner = optimizer.get_grad_norm

    def checked():
        norm = inner()
        if norm is not None and not math.isfinite(float(norm)):
            raise NonFiniteGradNorm(float(norm))
        return norm

    optimizer.get_grad_norm = checked


class LossGuard:
    """Decides, per step, ``None`` (apply the update) or a reason to skip / stop."""

    def __init__(self, train_cfg, stage: str, window: Optional[list[float]] = None):
        self.cfg, self.stage = train_cfg, stage
        self.window: deque[float] = deque(window or [], maxlen=train_cfg.spike_window)

    def state(self) -> list[float]:
        """The running window, saved with checkpoints so a resumed run judges spikes identically."""
        return list(self.window)

    def _stop(self, step: int, what: str, value: float, why: str) -> TrainingDiverged:
        return TrainingDiverged(f"[{self.stage}] step {step}: {what}={value} {why}; stopping "
                                f"(guard.on_{'spike' if 'median' in why else 'nonfinite'}=stop), "
                                f"nothing of this step saved, the newest checkpoint is the last good one")

    def nonfinite(self, step: int, what: str, value: float) -> str:
        """A NaN/Inf ``what`` (loss or grad_norm): returns the skip reason or raises TrainingDiverged."""
        if self.cfg.on_nonfinite == "stop":
            raise self._stop(step, what, value, "is not finite")
        return f"non-finite {what} ({value})"

    def judge_loss(self, step: int, loss: float) -> tuple[Optional[str], Optional[str]]:
        """Before the update: (skip reason or None, warning or None); raises to stop."""
        if not math.isfinite(loss):
            return self.nonfinite(step, "loss", loss), None
        f = self.cfg.spike_factor
        if f is not None and len(self.window) == self.window.maxlen:
            med = statistics.median(self.window)
            if loss > f * med:
                why = f"> {f} x running median {med:.4g} of the last {len(self.window)} steps"
                if self.cfg.on_spike == "stop":
                    raise self._stop(step, "loss", loss, why)
                if self.cfg.on_spike == "skip":
                    return f"loss spike ({loss:.4g} {why})", None
                return None, f"[{self.stage}] step {step}: loss spike {loss:.4g} {why} (on_spike=warn)"
        return None, None

    def accepted(self, loss: float) -> None:
        """An applied step's loss joins the running window (skipped ones never do)."""
        self.window.append(loss)
