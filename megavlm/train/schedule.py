"""Learning-rate schedules: pure functions of the step, with no hidden state.

Because the LR of step t is computed from (t, stage config) alone, resuming can never shift it.

* ``cosine(t; T, W, peak, final)`` — linear warmup ``peak·t/W`` for t < W, then
  ``final + (peak−final)·½·(1+cos(π·(t−W)/(T−W)))``.
* ``continue(t; T2, source, f)`` = ``lr_source(f·T_src + (1−f)·T_src·t/(T2−1))`` — a stage started
  from the checkpoint at fraction f of ``source`` squeezes the rest of the source's schedule into
  its own T2 steps: it starts at the source's LR at f and ends at the source's final LR
  (the paper's Figure 3).
* ``rewarm(t; T2, w, peak, final)`` = ``cosine(t; T2, ⌈w·T2⌉, peak, final)``.

This module holds only these functions and the description a checkpoint records of them; which
schedule a stage of a recipe gets (and its steps) is resolved in megavlm.train.plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

from megavlm.config import ConfigError


def cosine(t: float, T: int, W: int, peak: float, final: float) -> float:
    if t < W:
        return peak * t / W
    if T <= W:
        return final
    return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * (t - W) / (T - W)))


def continued(t: float, T2: int, source_lr: Callable[[float], float], T_src: int, f: float) -> float:
    progress = 1.0 if T2 <= 1 else t / (T2 - 1)
    return source_lr(f * T_src + (1.0 - f) * T_src * progress)


def rewarm(t: float, T2: int, w: float, peak: float, final: float) -> float:
    return cosine(t, T2, math.ceil(w * T2), peak, final)


@dataclass(frozen=True)
class StageSchedule:
    """The resolved schedule of one stage."""

    kind: str
    steps: int
    lr: Callable[[float], float]
    peak: Optional[float]
    final: Optional[float]
    warmup_steps: Optional[int]
    source_stage: Optional[str]
    source_fraction: Optional[float]
    source: Optional[dict] = None
    """continue from an imported checkpoint: the resolved source schedule (see continue_imported)."""
    parent: Optional["StageSchedule"] = None
    """continue from a stage: that stage's schedule (what :func:`recorded` writes into meta.json)."""

    def describe(self) -> dict:
        d = {"kind": self.kind, "peak": self.peak, "final": self.final,
             "warmup_steps": self.warmup_steps, "source_stage": self.source_stage,
             "source_fraction": self.source_fraction}
        if self.source is not None:
            d["source"] = dict(self.source)
        return d


class ScheduleError(ConfigError):
    """A continue schedule whose source cannot be resolved (raised at plan time, before training)."""


def lr_from_description(desc: dict) -> Callable[[float], float]:
    """The LR function a schedule description (``StageSchedule.describe()`` plus ``steps``, as
    checkpoints record it, or a ``schedule.source``) stands for; a continue nests its source."""
    kind, T = desc["kind"], int(desc["steps"])
    if kind in ("cosine", "rewarm"):
        return lambda t: cosine(t, T, int(desc["warmup_steps"]), float(desc["peak"]), float(desc["final"]))
    if kind == "continue" and isinstance(desc.get("source"), dict):
        src = desc["source"]
        inner = lr_from_description(src)
        return lambda t: continued(t, T, inner, int(src["steps"]), float(src["fraction"]))
    raise ScheduleError(f"cannot rebuild a {kind!r} schedule from {desc}")


def recorded(s: StageSchedule) -> dict:
    """The self-contained description a checkpoint's meta.json keeps, so a later run can continue
    it from ``init.path`` alone (:func:`lr_from_description` rebuilds the LR from it)."""
    d = {k: v for k, v in s.describe().items() if k != "source"}
    d["steps"] = s.steps
    if s.source is not None:
        d["source"] = {k: v for k, v in s.source.items() if k != "from"}
    elif s.parent is not None:
        d["source"] = {**recorded(s.parent), "fraction": s.source_fraction}
    return d
