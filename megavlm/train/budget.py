"""How many optimizer steps a stage takes, decided before training from its budget.

A stage's budget is one of (``StageConfig.budget`` / ``batch_unit`` / ``epochs``):

* ``positions`` — ``tokens`` counts every sequence position, padding included:
  ``steps = ceil(tokens / (global_batch x seq))`` (the original rule, megavlm.train.schedule).
* ``real`` — ``tokens`` counts non-padding positions (image patches included, as the paper counts
  an image as 729 tokens and holds 28B real tokens across caption ratios, paper Sec. 3.2): the
  data plan (megavlm.data.mixture) is walked over the known sample lengths until that many real
  positions are planned. The plan is a pure function of (seed, stage, lengths), so the step count
  — and with it the LR schedule — is fixed before the first step and a resumed run agrees.
* ``epochs`` with ``batch_unit: rows`` — epochs x the positions of one pass over the data.
* ``epochs`` with ``batch_unit: examples`` — Prismatic/LLaVA semantics: one conversation per row,
  ``train.global_batch_size`` examples per step, ``steps = ceil(epochs x examples / batch)``.

When the data is not at hand (``plan`` of a paper-scale recipe on a laptop), data-dependent
budgets fall back to the positions formula (or ``epoch_examples``) and say so: ``estimated: true``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

from megavlm.config import ConfigError, RunConfig, StageConfig


class BudgetError(ConfigError):
    """A stage whose budget cannot be met (e.g. epochs of an empty dataset), found before training."""


@dataclass(frozen=True)
class StageBudget:
    steps: int
    method: str
    """positions | real | epochs-rows | epochs-examples"""
    estimated: bool = False
    """True when the data needed for an exact count was absent (or the walk was extrapolated)."""
    padding_fraction: Optional[float] = None
    """Padding share of the stage's planned positions, where the plan was walked."""
    real_tokens: Optional[int] = None
    examples: Optional[int] = None
    note: str = ""

    def describe(self) -> dict:
        d: dict[str, Any] = {"budget": self.method, "estimated": self.estimated,
                             "padding_fraction": self.padding_fraction}
        if self.real_tokens is not None:
            d["real_tokens"] = self.real_tokens
        if self.examples is not None:
            d["examples_per_epoch"] = self.examples
        if self.note:
            d["budget_note"] = self.note
        return d


def positions_steps(run: RunConfig, st: StageConfig, tokens: Optional[int] = None) -> int:
    from megavlm.train.schedule import stage_steps

    return stage_steps(run, st, tokens)


def _needs_data(st: StageConfig) -> bool:
    return st.budget == "real" or st.epochs is not None


def stage_budget(run: RunConfig, st: StageConfig, loader: Any = None, data_error: str = "") -> StageBudget:
    """The step count of ``st``; ``loader`` is the stage's StageLoader (None = data absent,
    ``data_error`` says why)."""
    B = run.train.global_batch_size
    if st.epochs is not None and st.batch_unit == "examples":
        if loader is None:
            if st.epoch_examples is None:
                return StageBudget(positions_steps(run, st), "epochs-examples", True,
                                   note=f"data absent ({data_error}) and no epoch_examples: positions formula")
            return StageBudget(max(1, math.ceil(st.epochs * st.epoch_examples / B)), "epochs-examples", True,
                               examples=st.epoch_examples,
                               note=f"data absent ({data_error}): stated epoch_examples={st.epoch_examples}")
        n = int(getattr(loader, "num_examples", 0))
        if n == 0:
            raise BudgetError(f"stage {st.name} is sized as epochs={st.epochs} of examples but its "
                              f"instruction data ({run.data.instructions}) holds no examples")
        return StageBudget(max(1, math.ceil(st.epochs * n / B)), "epochs-examples", examples=n)
    if st.epochs is not None:
        if loader is None:
            return StageBudget(positions_steps(run, st), "epochs-rows", True,
                               note=f"data absent ({data_error}): positions formula on tokens")
        per_epoch = int(loader.tokens_per_epoch)
        if per_epoch <= 0:
            raise BudgetError(f"stage {st.name} is sized as epochs={st.epochs} but one pass over its data "
                              "is empty")
        return StageBudget(positions_steps(run, st, st.epochs * per_epoch), "epochs-rows")
    if st.budget == "real":
        if loader is None or not hasattr(loader, "fresh_planner"):
            return StageBudget(positions_steps(run, st), "real", True,
                               note=f"data absent ({data_error}): steps from tokens / (batch x seq), "
                                    "padding not counted")
        from megavlm.data.mixture import steps_for_real_tokens

        r = steps_for_real_tokens(loader.fresh_planner(), st.tokens, B)
        return StageBudget(r.steps, "real", r.extrapolated, round(r.padding_fraction, 6), r.real_tokens,
                           note=f"extrapolated past {r.rows} planned rows" if r.extrapolated else "")
    return StageBudget(positions_steps(run, st), "positions")


def plan_loader(run: RunConfig, st: StageConfig):
    """A dp-1 loader over the stage's data for sizing it, or (None, why) when the data is absent."""
    from megavlm.data.indexed import DataError
    from megavlm.data.mixture import StageLoader
    from megavlm.data.tokenizer import TokenizerError

    try:
        return StageLoader(run.data, st.mixture, seq_length=run.stage_seq_length(st), micro_batch_size=1,
                           num_microbatches=1, dp_rank=0, dp_size=1, seed=run.seed, stage=st.name,
                           vision=run.model.vision,
                           examples_per_row=1 if st.batch_unit == "examples" else None,
                           pack_window=st.pack_window,
                           text_attention=st.text_attention), ""  # issue 25: per-stage text attention
    except (DataError, TokenizerError, FileNotFoundError, OSError) as e:
        return None, str(e).splitlines()[0][:200]


def plan_budgets(run: RunConfig) -> dict[str, StageBudget]:
    """Every stage's budget for ``megavlm plan`` (reads sample lengths where the data is there)."""
    out = {}
    for st in run.stages:
        loader, why = plan_loader(run, st) if _needs_data(st) else (None, "")
        out[st.name] = stage_budget(run, st, loader, why)
    return out


def training_steps(run: RunConfig, st: StageConfig, factory: Callable, parallel, num_microbatches: int) -> int:
    """The step count the trainer uses: the same rules as plan, with the run's own loaders (the
    data must be there; a missing dataset is the loader's error)."""
    if not _needs_data(st):
        return positions_steps(run, st)
    return stage_budget(run, st, factory(st, parallel, num_microbatches)).steps
