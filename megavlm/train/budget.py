"""How many optimizer steps a stage takes, decided before training from its budget.

A stage's budget is one of (``StageConfig.budget`` / ``batch_unit`` / ``epochs``):

* ``positions`` — ``tokens`` counts every sequence position, padding included:
  ``steps = ceil(tokens / (global_batch x seq))`` (:func:`positions_steps`).
* ``real`` — ``tokens`` counts non-padding positions (image patches included, as the paper counts
  an image as 729 tokens and holds 28B real tokens across caption ratios, paper Sec. 3.2): the
  data plan (megavlm.data.mixture) is walked over the known sample lengths until that many real
  positions are planned. The plan is a pure function of (seed, stage, lengths), so the step count
  — and with it the LR schedule — is fixed before the first step and a resumed run agrees.
* ``epochs`` with ``batch_unit: rows`` — epochs x the positions of one pass over the data.
* ``epochs`` with ``batch_unit: examples`` — Prismatic/LLaVA semantics: one conversation per row,
  the stage's global batch of examples per step, ``steps = ceil(epochs x examples / batch)``.

"global batch" is the stage's own (``stages.<i>.global_batch_size``, else
``train.global_batch_size``: RunConfig.stage_global_batch).

When the data is not at hand (``plan`` of a paper-scale recipe on a laptop), data-dependent
budgets fall back to the positions formula (or ``epoch_examples``) and say so: ``estimated: true``.

The budget reads the stage's resolved row length and its loader (megavlm.train.plan resolves both
and is the only caller); it imports neither the schedule nor the plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from megavlm.config import ConfigError, RunConfig, StageConfig
from megavlm.train.loader import SizedLoader


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


def tokens_per_step(run: RunConfig, seq_length: int, global_batch: Optional[int] = None) -> int:
    """Positions one optimizer step trains on: the stage's global batch (default
    train.global_batch_size) x its row length."""
    return (run.train.global_batch_size if global_batch is None else global_batch) * seq_length


def positions_steps(run: RunConfig, seq_length: int, tokens: int, global_batch: Optional[int] = None) -> int:
    """ceil(tokens / (global_batch x seq_length)), at least 1."""
    return max(1, math.ceil(tokens / tokens_per_step(run, seq_length, global_batch)))


def needs_data(st: StageConfig) -> bool:
    """Whether the stage's step count depends on its data (real tokens or epochs)."""
    return st.budget == "real" or st.epochs is not None


def stage_budget(run: RunConfig, st: StageConfig, seq_length: int, loader: Optional[SizedLoader] = None,
                 data_error: str = "") -> StageBudget:
    """The step count of ``st`` at rows of ``seq_length``; ``loader`` is the stage's loader (None =
    data absent, ``data_error`` says why)."""
    B = run.stage_global_batch(st)
    positions = positions_steps(run, seq_length, st.tokens, B)
    if st.epochs is not None and st.batch_unit == "examples":
        if loader is None:
            if st.epoch_examples is None:
                return StageBudget(positions, "epochs-examples", True,
                                   note=f"data absent ({data_error}) and no epoch_examples: positions formula")
            return StageBudget(max(1, math.ceil(st.epochs * st.epoch_examples / B)), "epochs-examples", True,
                               examples=st.epoch_examples,
                               note=f"data absent ({data_error}): stated epoch_examples={st.epoch_examples}")
        n = int(loader.num_examples)
        if n == 0:
            raise BudgetError(f"stage {st.name} is sized as epochs={st.epochs} of examples but its "
                              f"instruction data ({run.data.instructions}) holds no examples")
        return StageBudget(max(1, math.ceil(st.epochs * n / B)), "epochs-examples", examples=n)
    if st.epochs is not None:
        if loader is None:
            return StageBudget(positions, "epochs-rows", True,
                               note=f"data absent ({data_error}): positions formula on tokens")
        per_epoch = int(loader.tokens_per_epoch)
        if per_epoch <= 0:
            raise BudgetError(f"stage {st.name} is sized as epochs={st.epochs} but one pass over its data "
                              "is empty")
        return StageBudget(positions_steps(run, seq_length, st.epochs * per_epoch, B), "epochs-rows")
    if st.budget == "real":
        if loader is None:
            return StageBudget(positions, "real", True,
                               note=f"data absent ({data_error}): steps from tokens / (batch x seq), "
                                    "padding not counted")
        from megavlm.data.mixture import steps_for_real_tokens

        r = steps_for_real_tokens(loader.fresh_planner(), st.tokens, B)
        return StageBudget(r.steps, "real", r.extrapolated, round(r.padding_fraction, 6), r.real_tokens,
                           note=f"extrapolated past {r.rows} planned rows" if r.extrapolated else "")
    return StageBudget(positions, "positions")
