"""Running a recipe: its stages in order, each resuming where it stopped.

Re-running the same command resumes from the newest complete checkpoint of the first unfinished
stage; finished stages are skipped. The resolved config is written to ``<run_dir>/config.yaml``
and a fingerprint of the data to ``<run_dir>/data.json``; a folder whose checkpoints were made with
another config or other data is refused (megavlm.preflight.require_same_run) unless
``force_config``. With the default loaders every stage's data, the init checkpoints, the output
folder and its free disk are checked first (megavlm.preflight), before anything is written.
"""

from __future__ import annotations

from typing import Callable, Optional

from megavlm.config import RunConfig, num_microbatches
from megavlm.data.mixture import LoaderSpec
from megavlm.parallel.state import Parallel
from megavlm.train.loop import LoaderFactory, StageOutcome, StageTrainer
from megavlm.train.plan import StagePlan, build_loader, plan_run
from megavlm.train.preemption import spanning_run


def default_loader_factory(run: RunConfig, plans: Optional[dict[str, StagePlan]] = None) -> LoaderFactory:
    """Loaders over the prepared data of ``run.data`` (built before training: megavlm.prepare), each
    made by megavlm.train.plan.build_loader. Given the stages' ``plans`` (run_stages passes them),
    the first loader of each stage prints the stage's data summary line (:func:`data_summary`) on
    the logging rank."""
    described: set[str] = set()

    def make(spec: LoaderSpec, parallel: Parallel, num_microbatches: int):
        loader = build_loader(spec, micro_batch_size=run.train.micro_batch_size,
                              num_microbatches=num_microbatches, dp_rank=parallel.dp_rank, dp_size=parallel.dp)
        plan = (plans or {}).get(spec.stage)
        if plan is not None and spec.stage not in described and getattr(parallel, "is_logging_rank", True):
            described.add(spec.stage)
            print(data_summary(plan, loader), flush=True)
        return loader

    return make


def _batch_key(st) -> str:
    return f"stages.{st.name}.global_batch_size" if st.global_batch_size is not None else "train.global_batch_size"


def data_summary(plan: StagePlan, loader) -> str:
    """One line per stage: each set's examples and positions (image positions included), and
    how many passes over it the stage makes: its epochs, or its token budget (``tokens``) x the
    set's mixture fraction over the set's positions. ``loader``: the stage's loader
    (megavlm.train.plan.build_loader: its ``sources`` by kind); mixture and epochs are the plan's
    loader spec, tokens the plan's stage."""
    spec = plan.loader
    parts = []
    fractions = [spec.mixture.text, spec.mixture.captions, spec.mixture.instructions]
    for kind, src, f in zip(("text", "captions", "instructions"), loader.sources, fractions):
        if src is None:
            continue
        n, positions = len(src), int(sum(int(x) for x in src.lengths))
        if spec.epochs is not None:
            passes = f"{spec.epochs} epoch(s)"
        else:
            passes = f"~{plan.config.tokens * f / max(positions, 1):.2f} passes"
        parts.append(f"{kind} {n:,} examples, {positions:,} tokens, {passes}")
    return f"[data] stage {plan.name}: " + "; ".join(parts)


@spanning_run  # stop signals are caught between stages too (megavlm.train.preemption)
def run_stages(run: RunConfig, parallel: Parallel, loader_factory: Optional[LoaderFactory] = None,
               log: Callable[[str], None] = print, only: Optional[list[str]] = None,
               stop_after: Optional[int] = None, observer=None, force_config: bool = False,
               check: bool = True) -> list[StageOutcome]:
    from megavlm import preflight

    if check and loader_factory is None:
        preflight.require_ready(run)
    if not force_config:
        preflight.require_same_run(run)
    if parallel.rank == 0:
        preflight.record_run(run, data=loader_factory is None)
    parallel.barrier()
    if loader_factory is None:  # the data must be there: a missing set is the loader's error, no estimate
        sizer = lambda st, spec: build_loader(spec)  # noqa: E731
    else:  # test / benchmark loaders size the stages they feed
        def sizer(st, spec):
            nmb = num_microbatches(run.train, parallel.dp, run.stage_global_batch(st),
                                   where=_batch_key(st))
            return loader_factory(spec, parallel, nmb)
    # budgets (positions, real tokens or epochs), schedules, checkpoints: megavlm.train.plan,
    # the same resolution `megavlm plan` prints (with the data present, the same steps)
    plans = plan_run(run, sizer=sizer)
    for st in run.stages:  # every stage's batch splits into microbatches: found before any stage trains
        if not only or st.name in only:
            num_microbatches(run.train, parallel.dp, plans[st.name].global_batch_size, where=_batch_key(st))
    factory = loader_factory or default_loader_factory(run, plans)  # default: a [data] line per stage
    out = []
    for st in run.stages:
        if only and st.name not in only:
            continue
        trainer = StageTrainer(run, plans[st.name], parallel, factory,
                               log=log if parallel.is_logging_rank else (lambda s: None))
        out.append(trainer.train(stop_after=stop_after, observer=observer))
        if stop_after is not None and not out[-1].skipped:
            break
    return out
