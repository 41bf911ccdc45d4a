"""Learning-rate schedules: pure functions of the step, with no hidden state.

Because the LR of step t is computed from (t, stage config) alone, resuming can never shift it.

* ``cosine(t; T, W, peak, final)`` — linear warmup ``peak·t/W`` for t < W, then
  ``final + (peak−final)·½·(1+cos(π·(t−W)/(T−W)))``.
* ``continue(t; T2, source, f)`` = ``lr_source(f·T_src + (1−f)·T_src·t/(T2−1))`` — a stage started
  from the checkpoint at fraction f of ``source`` squeezes the rest of the source's schedule into
  its own T2 steps: it starts at the source's LR at f and ends at the source's final LR
  (the paper's Figure 3).
* ``rewarm(t; T2, w, peak, final)`` = ``cosine(t; T2, ⌈w·T2⌉, peak, final)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

from megavlm.config import RunConfig, StageConfig


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


def tokens_per_step(run: RunConfig, stage: StageConfig) -> int:
    """Positions one optimizer step of ``stage`` trains on: global batch x the stage's seq_length."""
    return run.train.global_batch_size * run.stage_seq_length(stage)


def stage_steps(run: RunConfig, stage: StageConfig, tokens: Optional[int] = None) -> int:
    """Optimizer steps of a stage: ceil(tokens / (global_batch · seq_length)), at least 1, with the
    stage's own seq_length (``stages.<i>.seq_length``, default model.seq_length)."""
    per_step = tokens_per_step(run, stage)
    return max(1, math.ceil((tokens if tokens is not None else stage.tokens) / per_step))


def checkpoint_steps(stage: StageConfig, steps: int) -> list[tuple[float, int]]:
    """(fraction, step) pairs: the checkpoint at fraction f is taken after round(f·T) steps."""
    return [(f, max(1, round(f * steps))) for f in sorted(stage.checkpoint_fractions)]


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

    def describe(self) -> dict:
        return {"kind": self.kind, "peak": self.peak, "final": self.final,
                "warmup_steps": self.warmup_steps, "source_stage": self.source_stage,
                "source_fraction": self.source_fraction}


def resolve_schedules(run: RunConfig, steps: dict[str, int]) -> dict[str, StageSchedule]:
    """Every stage's schedule, given each stage's step count (continue reads its source's)."""
    out: dict[str, StageSchedule] = {}
    for st in run.stages:
        sc, T = st.schedule, steps[st.name]
        if sc.kind == "cosine":
            W = sc.warmup_steps if sc.warmup_steps is not None else math.ceil(sc.warmup_fraction * T)
            fn = (lambda t, T=T, W=W, p=sc.peak, fi=sc.final: cosine(t, T, W, p, fi))
            out[st.name] = StageSchedule("cosine", T, fn, sc.peak, sc.final, W, None, None)
        elif sc.kind == "rewarm":
            W = math.ceil(sc.warmup_fraction * T)
            fn = (lambda t, T=T, w=sc.warmup_fraction, p=sc.peak, fi=sc.final: rewarm(t, T, w, p, fi))
            out[st.name] = StageSchedule("rewarm", T, fn, sc.peak, sc.final, W, None, None)
        else:
            src = out[st.init.stage]
            fn = (lambda t, T=T, s=src, f=st.init.fraction: continued(t, T, s.lr, s.steps, f))
            out[st.name] = StageSchedule("continue", T, fn, None, src.lr(src.steps), None,
                                         st.init.stage, st.init.fraction)
    return out


def plan(run: RunConfig, steps: Optional[dict[str, int]] = None, points: int = 101) -> dict:
    """The run's plan without training: per stage its tokens, seq_length, steps, checkpoint steps, schedule
    and ``points`` evenly spaced (step, lr) samples from the first to the last step."""
    steps = steps or {st.name: stage_steps(run, st) for st in run.stages}
    scheds = resolve_schedules(run, steps)
    stages = []
    for st in run.stages:
        s = scheds[st.name]
        T = s.steps
        xs = [(T - 1) * i / (points - 1) for i in range(points)]
        stages.append({
            "name": st.name,
            "tokens": st.tokens,
            "seq_length": run.stage_seq_length(st),
            "tokens_per_step": tokens_per_step(run, st),
            "steps": T,
            "checkpoints": [[f, k] for f, k in checkpoint_steps(st, T)],
            "lr": [[x, s.lr(x)] for x in xs],
            "schedule": s.describe(),
        })
    return {"stages": stages}
