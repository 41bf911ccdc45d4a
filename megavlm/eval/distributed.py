"""Data-parallel evaluation: which questions a rank answers, and bringing every rank's rows home.

``torchrun --nproc_per_node=N -m megavlm eval vision …`` loads the checkpoint whole on every rank
(tp = pp = 1, so the data-parallel group is the world) and :class:`EvalShards` deals the
questions of each task out *strided*: rank r answers questions r, r + N, r + 2N, … — fixed by
position alone, so it is deterministic, and long and short questions spread evenly. Each rank
produces its per-question result rows; ``all_gather_object`` over the data-parallel group hands
every rank all rows, which are put back in question order, so the scores are computed from
exactly the rows one process would have produced. ``all_gather_object`` pickles the rows into
byte tensors on the current device, which is right for gloo (CPU) and, because
megavlm.parallel.state.Parallel sets the CUDA device of each rank, for NCCL too.

Only rank 0 (``is_main``) prints and writes files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence


@dataclass(frozen=True)
class EvalShards:
    """This rank's place among the data-parallel evaluation ranks."""

    rank: int = 0
    world: int = 1
    group: Optional[Any] = None
    """The data-parallel process group (None: the default group)."""

    @classmethod
    def from_parallel(cls, parallel) -> "EvalShards":
        """From a megavlm.parallel.state.Parallel (one process: a world of one)."""
        if parallel is None or parallel.dp == 1:
            return cls()
        return cls(parallel.dp_rank, parallel.dp, parallel.dp_group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def indices(self, n: int) -> list[int]:
        """Positions of the ``n`` questions this rank answers (strided)."""
        return list(range(self.rank, n, self.world))

    def gather(self, indices: Sequence[int], rows: Sequence[Any], n: int) -> list[Any]:
        """All ranks' rows of ``n`` questions in question order (every rank gets them all)."""
        if len(indices) != len(rows):
            raise ValueError(f"rank {self.rank}: {len(rows)} rows for {len(indices)} questions")
        if self.world == 1:
            return list(rows)
        import torch.distributed as dist

        parts: list = [None] * self.world
        dist.all_gather_object(parts, list(zip(indices, rows)), group=self.group)
        out: list = [None] * n
        for part in parts:
            for i, r in part:
                out[i] = r
        missing = [i for i, r in enumerate(out) if r is None]
        if missing:
            raise RuntimeError(f"data-parallel gather lost the rows of questions {missing[:5]}")
        return out

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier(group=self.group)
