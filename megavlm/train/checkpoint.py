"""Training checkpoints: saving model, optimizer and data position, resuming, pruning.

The on-disk format — directory layout, ``meta.json``, finding a checkpoint, loading model
weights — is megavlm.checkpoint_format's (evaluation and the tools read checkpoints without the
trainer); its names are re-exported here for the orchestrators (stages, demo, experiment).

A checkpoint is written under ``.tmp-step_…`` and renamed only after every rank has finished, so
a run killed mid-write leaves no checkpoint that looks complete; the next run removes the
leftover (:func:`clean_partial`) and resumes from the newest complete one. The megatron-core
workarounds the optimizer state needs live in megavlm.parallel.megatron_compat.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from megavlm.checkpoint_format import (  # noqa: F401  (re-exported for existing callers)
    CONFIG, META, TOKENIZER_DIR, CheckpointError, CheckpointInfo, at_fraction, latest,
    list_checkpoints, load_model_weights, model_sharded_state, put_model_state, require_complete,
    shape_check, stage_dir, tokenizer_file)
from megavlm import run_folder
from megavlm.parallel import megatron_compat


def save(path: Path, chunks: list, optimizer, meta: dict, loader_state: dict, dp_rank: int,
         write_loader: bool, run_config=None, tokenizer: Optional[Path] = None) -> None:
    """Write a complete checkpoint at ``path`` (collective: every rank calls it); the last step,
    :func:`publish`, is what makes it complete."""
    from megatron.core import dist_checkpointing

    tmp = path.with_name(".tmp-" + path.name)
    rank0 = dist.get_rank() == 0
    if rank0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)  # megatron wants an existing, empty folder
    dist.barrier()
    state = model_sharded_state(chunks)
    if _holds_params(optimizer):
        state["optimizer"] = optimizer.sharded_state_dict(
            state, is_loading=False, metadata=optimizer_metadata(optimizer))
    with megatron_compat.in_process_write_queue():
        dist_checkpointing.save(state, str(tmp))
    if write_loader:
        run_folder.loader_state_file(tmp, dp_rank).parent.mkdir(exist_ok=True)
        run_folder.loader_state_file(tmp, dp_rank).write_text(json.dumps(loader_state))
    dist.barrier()
    if rank0:
        # a checkpoint describes itself: the resolved config and the tokenizer travel with it
        if run_config is not None:
            run_config.dump(tmp / CONFIG)
        if tokenizer is not None and Path(tokenizer).is_file():
            (tmp / TOKENIZER_DIR).mkdir(exist_ok=True)
            shutil.copy2(tokenizer, tmp / TOKENIZER_DIR / Path(tokenizer).name)
        (tmp / META).write_text(json.dumps(meta, indent=1))
        publish(tmp, path)
    dist.barrier()


def optimizer_metadata(optimizer) -> dict:
    """How the DistributedOptimizer's state is checkpointed: ``fully_reshardable`` (loads at any
    layout) in megatron's memory-efficient form, which gathers each DP group's fp32 state over a
    gloo group onto its DP rank 0 only. Without it megatron all-gathers the whole state onto the
    host of *every* DP rank (~17 GB per rank at 1.4B, ~84 GB at 7B). The two forms read each
    other's checkpoints (distrib_optimizer.py:1690 sharded_param_state_fully_reshardable)."""
    plain = {"distrib_optim_sharding_type": "fully_reshardable"}
    inner = [o for o in getattr(optimizer, "chained_optimizers", [optimizer])
             if hasattr(o, "data_parallel_group_gloo")]
    if all(dist.get_world_size(o.data_parallel_group) == 1 for o in inner):
        return plain  # one DP rank: the exchange moves nothing, and no gloo group is needed
    attach_gloo_dp_groups(optimizer)
    return dict(plain, distrib_optim_fully_reshardable_mem_efficient=True)


def attach_gloo_dp_groups(optimizer) -> None:
    """Give each DistributedOptimizer the gloo copy of its data-parallel group (the memory-
    efficient gather runs on the host). Under NCCL megavlm builds the optimizer without gloo
    groups (megavlm.train.loop.build_optimizer), so the copy that megavlm.parallel.state creates
    for every backend is attached here; its ranks must be the optimizer's DP group's."""
    from megatron.core import parallel_state as ps

    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not hasattr(inner, "data_parallel_group_gloo"):
            continue  # not a DistributedOptimizer: its state is whole on every rank
        if inner.data_parallel_group_gloo is not None:
            continue
        try:
            gloo = ps.get_data_parallel_group_gloo(with_context_parallel=True)
        except AssertionError as e:
            raise CheckpointError(f"no gloo data-parallel group to gather the optimizer state over "
                                  f"({e}); megavlm.parallel.state creates one for several processes") from e
        want = dist.get_process_group_ranks(inner.data_parallel_group)
        have = dist.get_process_group_ranks(gloo)
        if want != have:
            raise CheckpointError(f"the gloo data-parallel group holds ranks {have}, the optimizer's "
                                  f"data-parallel group {want}: cannot gather its state for a checkpoint")
        inner.data_parallel_group_gloo = gloo


def publish(tmp: Path, path: Path) -> None:
    """The rename that turns the written ``.tmp-…`` folder into the checkpoint ``path``.

    Everything before it leaves only a partial folder that the next run removes; a process killed
    before it therefore leaves no checkpoint. It is also the seam the resume tests stop a run
    at (tests/parallel/dist_worker.py patches it) to prove that."""
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


def _holds_params(optimizer) -> bool:
    """False on a rank with nothing to optimize (e.g. the last pipeline stage of a
    projector-only stage): such a rank saves and loads no optimizer state."""
    if optimizer is None:
        return False
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(len(g["params"]) for o in inner for g in o.optimizer.param_groups)


def load(info_path: Path, chunks: list, optimizer=None) -> None:
    """Load model (and optimizer) state in place from a complete checkpoint."""
    from megatron.core import dist_checkpointing

    if not _holds_params(optimizer):
        optimizer = None
    if optimizer is None:
        load_model_weights(info_path, chunks)
        return
    require_complete(info_path)
    state = model_sharded_state(chunks)
    shape_check(state, info_path)
    megatron_compat.prime_optimizer_state(optimizer)
    state["optimizer"] = optimizer.sharded_state_dict(
        state, is_loading=True, metadata=optimizer_metadata(optimizer))
    loaded = dist_checkpointing.load(state, str(info_path))
    put_model_state(chunks, loaded, info_path)
    with megatron_compat.adam_step_is_not_a_shard():
        optimizer.load_state_dict(loaded["optimizer"])
    megatron_compat.unshare_adam_steps(optimizer)


def read_loader_state(path: Path, dp_rank: int) -> dict:
    f = run_folder.loader_state_file(path, dp_rank)
    if not f.is_file():
        raise CheckpointError(f"{path}: no data position for data-parallel rank {dp_rank} ({f.name}); "
                              f"was it saved with a different data-parallel size?")
    return json.loads(f.read_text())


def clean_partial(run_dir: str | Path, stage: str) -> None:
    """Remove leftovers of an interrupted write (rank 0 only)."""
    d = stage_dir(run_dir, stage)
    if d.is_dir() and dist.get_rank() == 0:
        for p in d.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


def prune(run_dir: str | Path, stage: str, keep_steps: set[int]) -> None:
    """Drop periodic checkpoints that are neither kept fractions nor the newest (rank 0 only)."""
    if dist.get_rank() != 0:
        return
    cps = list_checkpoints(run_dir, stage)
    for c in cps[:-1]:
        if not c.fractions and c.step not in keep_steps:
            shutil.rmtree(c.path, ignore_errors=True)
