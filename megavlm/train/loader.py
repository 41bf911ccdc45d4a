"""What the trainer and the stage planner read from a stage's loader, as typed Protocols.

megavlm.data.mixture.StageLoader is the real loader (built only by megavlm.train.plan.build_loader);
test and benchmark loaders implement :class:`StepLoader`, and :class:`SizedLoader` too when a stage
they feed is sized by its data (``epochs`` or ``budget: real``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # annotations only: the loop must not need the data package to import
    from megavlm.data.batch import Batch
    from megavlm.data.mixture import MixturePlanner


class StepLoader(Protocol):
    """What the training loop reads: one step's microbatches, the resumable position, and the
    mixture's position counts of the last step (empty when the loader does not count them)."""

    last_stats: dict[str, int]

    def next_step(self) -> list["Batch"]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class SizedLoader(StepLoader, Protocol):
    """What the budget reads to size a stage by its data (megavlm.train.budget)."""

    @property
    def tokens_per_epoch(self) -> int: ...

    @property
    def num_examples(self) -> int: ...

    def fresh_planner(self) -> "MixturePlanner": ...
