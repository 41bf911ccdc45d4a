"""Input shard lists and the worker's slice of them (parallel preparation).

Inputs are given as globs and brace ranges (``shard-{00000..00999}.tar``, expanded by
``braceexpand``, the expansion webdataset itself uses); the list is sorted and de-duplicated so
every worker sees the same order. A worker takes shards ``i`` with ``i % world == rank``; its rank
comes from torchrun (``RANK``/``WORLD_SIZE``) or a SLURM array (``SLURM_ARRAY_TASK_ID`` minus
``SLURM_ARRAY_TASK_MIN``, ``SLURM_ARRAY_TASK_COUNT``), so the same command runs as N workers.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Mapping, Optional, Sequence

from megavlm.data.indexed import DataError


def expand_inputs(patterns: Sequence[str | Path]) -> list[Path]:
    """Every file the patterns name, sorted, each once; a pattern matching nothing is an error."""
    from braceexpand import braceexpand

    out: set[Path] = set()
    for pat in patterns:
        hits: list[str] = []
        for one in braceexpand(str(pat)):
            if glob.has_magic(one):
                hits += [h for h in glob.glob(one) if Path(h).is_file()]
            elif Path(one).exists():  # a file, or a folder for the tools that take one
                hits.append(one)
            else:
                raise DataError(f"{one}: no such file (from input {pat})")
        if not hits:
            raise DataError(f"{pat}: matches no file")
        out.update(Path(h) for h in hits)
    return sorted(out)


def worker_rank(env: Optional[Mapping[str, str]] = None) -> tuple[int, int]:
    """(rank, world) of this worker: torchrun, then a SLURM array, else (0, 1)."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env and "RANK" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    elif "SLURM_ARRAY_TASK_COUNT" in env and "SLURM_ARRAY_TASK_ID" in env:
        world = int(env["SLURM_ARRAY_TASK_COUNT"])
        rank = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
    else:
        return 0, 1
    if not 0 <= rank < world:
        raise DataError(f"worker rank {rank} is outside 0..{world - 1} (check RANK/WORLD_SIZE or the "
                        f"SLURM array range)")
    return rank, world


def my_shards(shards: Sequence[Path], rank: int, world: int) -> list[tuple[int, Path]]:
    """(index in the full list, shard) of this worker's deterministic slice."""
    return [(i, s) for i, s in enumerate(shards) if i % world == rank]
