"""Running a recipe: its stages in order, each resuming where it stopped.

Re-running the same command resumes from the newest complete checkpoint of the first unfinished
stage; finished stages are skipped. The resolved config is written to ``<run_dir>/config.yaml``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from megavlm.config import RunConfig, StageConfig
from megavlm.parallel.state import Parallel
from megavlm.train.loop import LoaderFactory, StageOutcome, StageTrainer
from megavlm.train.schedule import resolve_schedules, stage_steps


def default_loader_factory(run: RunConfig) -> LoaderFactory:
    """Loaders over the prepared data of ``run.data`` (built on first use for the demo)."""
    from megavlm.data.demo import ensure_demo_corpus
    from megavlm.data.mixture import StageLoader

    def make(stage: StageConfig, parallel: Parallel, num_microbatches: int):
        ensure_demo_corpus(run.data, run.model.vision)
        return StageLoader(run.data, stage.mixture, seq_length=run.stage_seq_length(stage),
                           micro_batch_size=run.train.micro_batch_size,
                           num_microbatches=num_microbatches, dp_rank=parallel.dp_rank,
                           dp_size=parallel.dp, seed=run.seed, stage=stage.name,
                           vision=run.model.vision, epochs=stage.epochs)

    return make


def run_stages(run: RunConfig, parallel: Parallel, loader_factory: Optional[LoaderFactory] = None,
               log: Callable[[str], None] = print, only: Optional[list[str]] = None,
               stop_after: Optional[int] = None, fault: Optional[str] = None,
               observer=None) -> list[StageOutcome]:
    if parallel.rank == 0:
        Path(run.run_dir).mkdir(parents=True, exist_ok=True)
        run.dump(Path(run.run_dir) / "config.yaml")
    parallel.barrier()
    factory = loader_factory or default_loader_factory(run)
    steps = {}
    for st in run.stages:
        tokens = None
        if st.epochs is not None:  # fine-tuning: the budget is passes over the stage's data
            nmb = run.train.global_batch_size // (run.train.micro_batch_size * parallel.dp)
            tokens = st.epochs * factory(st, parallel, nmb).tokens_per_epoch
        steps[st.name] = stage_steps(run, st, tokens)
    scheds = resolve_schedules(run, steps)
    out = []
    for st in run.stages:
        if only and st.name not in only:
            continue
        trainer = StageTrainer(run, st, scheds[st.name], parallel, factory, log=log if parallel.is_logging_rank else (lambda s: None))
        out.append(trainer.train(stop_after=stop_after, fault=fault, observer=observer))
        if stop_after is not None and not out[-1].skipped:
            break
    return out
