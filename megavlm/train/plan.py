"""What each stage of a run is, resolved once: :class:`StagePlan`.

A recipe's stage is a few settings that depend on each other and on the run: its row length (its
own ``seq_length`` or ``model.seq_length``), its step count (from the budget, which may need the
data: megavlm.train.budget), its LR schedule (a ``continue`` needs its source stage's steps or the
meta.json of an imported checkpoint), its checkpoint steps, its AdamW settings and what its loader
is built from. :func:`plan_run` resolves all of them, in stage order, into frozen objects; the
training loop (megavlm.train.stages / loop), ``megavlm plan``, preflight, the sweep and the demo
read them and derive nothing themselves. :func:`build_loader` is the one constructor of a stage's
loader.

Imports: config, budget, schedule and the loader protocols; the data package only inside
:func:`build_loader`, megatron never — so ``megavlm plan`` and preflight run without either.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from megavlm.config import RunConfig, StageConfig, StageOptimizer
from megavlm.data.mixture import LoaderSpec
from megavlm.run_folder import META
from megavlm.train.budget import StageBudget, needs_data, positions_steps, stage_budget, tokens_per_step
from megavlm.train.loader import SizedLoader
from megavlm.train.schedule import ScheduleError, StageSchedule, continued, cosine, lr_from_description, rewarm


def loader_spec(run: RunConfig, stage: StageConfig) -> LoaderSpec:
    """What ``stage``'s loader is built from (the one place these stage settings are read for it)."""
    return LoaderSpec(stage=stage.name, data=run.data, mixture=stage.mixture, vision=run.model.vision,
                      seq_length=run.stage_seq_length(stage), seed=run.seed, epochs=stage.epochs,
                      examples_per_row=1 if stage.batch_unit == "examples" else None,
                      pack_window=stage.pack_window, text_attention=stage.text_attention)


def build_loader(spec: LoaderSpec, *, micro_batch_size: int = 1, num_microbatches: int = 1,
                 dp_rank: int = 0, dp_size: int = 1):
    """The stage loader (megavlm.data.mixture.StageLoader) of one data-parallel rank; the defaults
    make the single-rank loader that sizing and checks read."""
    from megavlm.data.mixture import StageLoader

    return StageLoader(spec, micro_batch_size=micro_batch_size, num_microbatches=num_microbatches,
                       dp_rank=dp_rank, dp_size=dp_size)


def sizing_loader(spec: LoaderSpec) -> tuple[Optional[SizedLoader], str]:
    """A single-rank loader over the stage's data for sizing it, or (None, why) when the data is absent."""
    from megavlm.data.indexed import DataError
    from megavlm.data.tokenizer import TokenizerError

    try:
        return build_loader(spec), ""
    except (DataError, TokenizerError, FileNotFoundError, OSError) as e:
        return None, str(e).splitlines()[0][:200]


@dataclass(frozen=True)
class StagePlan:
    """One stage, resolved: everything the trainer, ``megavlm plan``, preflight, the sweep and the
    demo read about it."""

    config: StageConfig
    """The stage as the recipe states it."""
    seq_length: int
    """Positions per row."""
    tokens_per_step: int
    """Positions per optimizer step (global batch x seq_length)."""
    global_batch_size: int
    """Rows (or examples, ``batch_unit: examples``) per optimizer step over all microbatches and
    data-parallel ranks: the stage's own ``global_batch_size``, else train.global_batch_size."""
    budget: StageBudget
    """How the step count was found (positions / real / epochs) and whether it is an estimate."""
    schedule: StageSchedule
    """The LR schedule over ``steps`` (``schedule.steps``)."""
    checkpoints: tuple[tuple[float, int], ...]
    """(fraction, step) of every checkpoint kept: fraction f is saved after round(f x steps) steps."""
    optimizer: StageOptimizer
    """AdamW settings (the stage's overrides over train's)."""
    loader: LoaderSpec
    """What the stage's loader is built from (:func:`build_loader`)."""

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def steps(self) -> int:
        return self.budget.steps

    def describe(self, points: int = 101) -> dict:
        """The stage for ``megavlm plan``: tokens, seq_length, steps, checkpoints, budget and
        ``points`` evenly spaced (step, lr) samples from the first to the last step."""
        T = self.steps
        xs = [(T - 1) * i / (points - 1) for i in range(points)]
        return {"name": self.name, "tokens": self.config.tokens, "seq_length": self.seq_length,
                "text_attention": self.loader.text_attention, "global_batch_size": self.global_batch_size,
                "batch_unit": self.config.batch_unit, "weight_decay": self.optimizer.weight_decay,
                "tokens_per_step": self.tokens_per_step, "steps": T,
                "checkpoints": [[f, k] for f, k in self.checkpoints],
                "lr": [[x, self.schedule.lr(x)] for x in xs], "schedule": self.schedule.describe(),
                **self.budget.describe()}


Sizer = Callable[[StageConfig, LoaderSpec], SizedLoader]
"""Makes the loader a data-sized stage is counted with (default: the single-rank data loader)."""


def plan_run(run: RunConfig, *, sizer: Optional[Sizer] = None,
             steps: Optional[dict[str, int]] = None) -> dict[str, StagePlan]:
    """Every stage of ``run`` resolved, by name, in stage order.

    Data-sized stages (``epochs``, ``budget: real``) are counted with ``sizer``'s loader; without one,
    with the single-rank loader over ``run.data``, and where that data is absent the budget falls
    back to an estimate that says so. ``steps`` fixes step counts instead (tests, benchmarks)."""
    out: dict[str, StagePlan] = {}
    for st in run.stages:
        spec = loader_spec(run, st)
        S = spec.seq_length
        if steps is not None and st.name in steps:
            budget = StageBudget(steps[st.name], "fixed")
        elif not needs_data(st):
            budget = stage_budget(run, st, S)
        elif sizer is not None:
            budget = stage_budget(run, st, S, sizer(st, spec))
        else:
            loader, why = sizing_loader(spec)
            budget = stage_budget(run, st, S, loader, why)
        B = run.stage_global_batch(st)
        out[st.name] = StagePlan(
            config=st, seq_length=S, tokens_per_step=tokens_per_step(run, S, B), global_batch_size=B,
            budget=budget, schedule=_schedule(st, budget.steps, out),
            checkpoints=checkpoint_steps(st, budget.steps), optimizer=_optimizer(run, st, out), loader=spec)
    return out


def _optimizer(run: RunConfig, st: StageConfig, earlier: dict[str, StagePlan]) -> StageOptimizer:
    """The stage's AdamW settings. Its weight decay, unless it sets one, is that of the stage it
    starts from (``init.stage``): the paper's image-text pre-training "follows the same procedure
    as text pre-training" (App. B), so the image stage decays as the text stage did, and fine-tuning
    as the stage it fine-tunes. Fresh and imported starts take optimizer.weight_decay."""
    opt = st.optimizer(run.optimizer)
    if st.weight_decay is None and st.init.stage is not None:
        opt = dataclasses.replace(opt, weight_decay=earlier[st.init.stage].optimizer.weight_decay)
    return opt


def describe_run(run: RunConfig, points: int = 101) -> dict:
    """``megavlm plan``'s view of the run (the JSON it prints with --json)."""
    return {"stages": [p.describe(points) for p in plan_run(run).values()]}


def checkpoint_steps(stage: StageConfig, steps: int) -> tuple[tuple[float, int], ...]:
    """(fraction, step) pairs: the checkpoint at fraction f is taken after round(f·T) steps."""
    return tuple((f, max(1, round(f * steps))) for f in sorted(stage.checkpoint_fractions))


def stage_positions_steps(run: RunConfig, stage: StageConfig) -> int:
    """The positions-formula step count of ``stage`` (ceil(tokens / (its global batch x its row
    length))): what a stage takes when its budget does not read its data."""
    return positions_steps(run, run.stage_seq_length(stage), stage.tokens, run.stage_global_batch(stage))


# ------------------------------------------------------------------ schedules


def _schedule(st: StageConfig, T: int, earlier: dict[str, StagePlan]) -> StageSchedule:
    sc = st.schedule
    if sc.kind == "cosine":
        W = sc.warmup_steps if sc.warmup_steps is not None else math.ceil(sc.warmup_fraction * T)
        fn = (lambda t, T=T, W=W, p=sc.peak, fi=sc.final: cosine(t, T, W, p, fi))
        return StageSchedule("cosine", T, fn, sc.peak, sc.final, W, None, None)
    if sc.kind == "rewarm":
        W = math.ceil(sc.warmup_fraction * T)
        fn = (lambda t, T=T, w=sc.warmup_fraction, p=sc.peak, fi=sc.final: rewarm(t, T, w, p, fi))
        return StageSchedule("rewarm", T, fn, sc.peak, sc.final, W, None, None)
    if st.init.stage is None:  # continue an imported checkpoint (init.path)
        return continue_imported(st, T)
    src = earlier[st.init.stage].schedule
    fn = (lambda t, T=T, s=src, f=st.init.fraction: continued(t, T, s.lr, s.steps, f))
    return StageSchedule("continue", T, fn, None, src.lr(src.steps), None, st.init.stage, st.init.fraction,
                         parent=src)


def read_checkpoint_source(path: str | Path) -> dict:
    """The source of a continue from one of our checkpoints: the schedule its meta.json records
    (written at save time by megavlm.train.loop) and the fraction step/steps it stands at. Reads
    only the JSON, so plan needs neither megatron nor the weights."""
    meta_path = Path(path).expanduser() / META
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
