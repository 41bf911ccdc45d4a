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

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from megavlm.config import ConfigError, RunConfig, StageConfig, num_microbatches  # noqa: F401  (re-exported)


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
        elif st.init.stage is None:  # continue an imported checkpoint (init.path)
            out[st.name] = continue_imported(st, T)
        else:
            src = out[st.init.stage]
            fn = (lambda t, T=T, s=src, f=st.init.fraction: continued(t, T, s.lr, s.steps, f))
            out[st.name] = StageSchedule("continue", T, fn, None, src.lr(src.steps), None,
                                         st.init.stage, st.init.fraction, parent=src)
    return out


def plan(run: RunConfig, steps: Optional[dict[str, int]] = None, points: int = 101) -> dict:
    """The run's plan without training: per stage its tokens, seq_length, steps, checkpoint steps, schedule
    and ``points`` evenly spaced (step, lr) samples from the first to the last step."""
    budgets = None
    if steps is None:
        from megavlm.train.budget import plan_budgets

        budgets = plan_budgets(run)
        steps = {name: b.steps for name, b in budgets.items()}
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
            "text_attention": st.text_attention,  # issue 25: document | window
            "tokens_per_step": tokens_per_step(run, st),
            "steps": T,
            "checkpoints": [[f, k] for f, k in checkpoint_steps(st, T)],
            "lr": [[x, s.lr(x)] for x in xs],
            "schedule": s.describe(),
            **(budgets[st.name].describe() if budgets else {}),
        })
    return {"stages": stages}


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


def read_checkpoint_source(path: str | Path) -> dict:
    """The source of a continue from one of our checkpoints: the schedule its meta.json records
    (written at save time by megavlm.train.loop) and the fraction step/steps it stands at. Reads
    only the JSON, so plan needs neither megatron nor the weights."""
    meta_path = Path(path).expanduser() / "meta.json"
    if not meta_path.is_file():
        raise ScheduleError(f"{meta_path} not found: a continue from init.path={path} without "
                            "schedule.source needs a checkpoint of ours (state schedule.source instead)")
    meta = json.loads(meta_path.read_text())
    sched = meta.get("schedule")
    if not isinstance(sched, dict) or not meta.get("steps"):
        raise ScheduleError(f"{meta_path} records no schedule (an imported or older checkpoint): "
                            "state the schedule it was trained on as schedule.source "
                            "{kind, peak, final, warmup_steps, steps, fraction}")
    src = {**sched, "steps": int(meta["steps"]), "fraction": int(meta["step"]) / int(meta["steps"])}
    src["from"] = str(meta_path)
    return src


def continue_imported(st: StageConfig, T: int) -> StageSchedule:
    """continue from ``init.path``: finish the stated (or recorded) source schedule in T steps."""
    if st.schedule.source is not None:
        src = st.schedule.source.describe()
    else:
        src = read_checkpoint_source(st.init.path)
    f = float(src["fraction"])
    if f >= 1.0 - 1e-9:
        raise ScheduleError(f"stage {st.name}: {st.init.path} stands at the end of its schedule "
                            "(fraction 1.0); continuing it stays at the final LR, which the paper calls "
                            "too low: use schedule.kind=rewarm")
    if not 0.0 < f < 1.0:
        raise ScheduleError(f"stage {st.name}: source fraction {f} must be in (0, 1)")
    inner = lr_from_description(src)
    fn = (lambda t, T=T, s=inner, n=int(src["steps"]), f=f: continued(t, T, s, n, f))
    return StageSchedule("continue", T, fn, None, inner(int(src["steps"])), None, None, f, source=src)



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
