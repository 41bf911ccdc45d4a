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

from megavlm.config import RunConfig, StageConfig
from megavlm.parallel.state import Parallel
from megavlm.train.loop import LoaderFactory, StageOutcome, StageTrainer
from megavlm.train.budget import training_steps
from megavlm.train.schedule import num_microbatches, resolve_schedules


def default_loader_factory(run: RunConfig) -> LoaderFactory:
    """Loaders over the prepared data of ``run.data`` (built before training: megavlm.prepare)."""
    from megavlm.data.mixture import StageLoader

    def make(stage: StageConfig, parallel: Parallel, num_microbatches: int):
        return StageLoader(run.data, stage.mixture, seq_length=run.stage_seq_length(stage),
                           micro_batch_size=run.train.micro_batch_size,
                           num_microbatches=num_microbatches, dp_rank=parallel.dp_rank,
                           dp_size=parallel.dp, seed=run.seed, stage=stage.name,
                           vision=run.model.vision, epochs=stage.epochs,
                           examples_per_row=1 if stage.batch_unit == "examples" else None,
                           pack_window=stage.pack_window,
                           text_attention=stage.text_attention)  # issue 25: per-stage text attention

    return make


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
    factory = loader_factory or default_loader_factory(run)
    steps = {}
    nmb = num_microbatches(run.train, parallel.dp)
    for st in run.stages:  # budgets: positions, real tokens or epochs (megavlm.train.budget)
        steps[st.name] = training_steps(run, st, factory, parallel, nmb)
    scheds = resolve_schedules(run, steps)
    out = []
    for st in run.stages:
        if only and st.name not in only:
            continue
        trainer = StageTrainer(run, st, scheds[st.name], parallel, factory, log=log if parallel.is_logging_rank else (lambda s: None))
        out.append(trainer.train(stop_after=stop_after, observer=observer))
        if stop_after is not None and not out[-1].skipped:
            break
    return out
