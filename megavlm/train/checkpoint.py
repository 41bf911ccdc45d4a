"""Checkpoints through megatron-core dist_checkpointing, complete or absent.

Layout: ``<run_dir>/<stage>/checkpoints/step_0000080/`` holds the sharded model (and optimizer)
state, ``meta.json`` (stage, step, steps, the fractions it stands for, tokens) and ``loader/dp<r>.json`` (each data
parallel rank's data position). A checkpoint is written under ``.tmp-step_…`` and renamed only
after every rank has finished, so a run killed mid-write leaves no checkpoint that looks
complete; the next run removes the leftover and resumes from the newest complete one.

Sharded tensor keys are global (layer numbers include the pipeline offset, TP shards carry their
offsets), so a checkpoint saved at one TP/PP layout loads at another.
"""

from __future__ import annotations

import contextlib
import json
import queue
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

META = "meta.json"
CONFIG = "config.yaml"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or does not fit the model."""


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    stage: str
    step: int
    steps: int
    fractions: tuple[float, ...]
    """Schedule fractions this checkpoint stands for (empty for a periodic one)."""

    @classmethod
    def read(cls, path: Path) -> "CheckpointInfo":
        m = json.loads((path / META).read_text())
        return cls(path=path, stage=m["stage"], step=m["step"], steps=m["steps"],
                   fractions=tuple(m.get("fractions", [])))


def stage_dir(run_dir: str | Path, stage: str) -> Path:
    return Path(run_dir) / stage / "checkpoints"


def list_checkpoints(run_dir: str | Path, stage: str) -> list[CheckpointInfo]:
    d = stage_dir(run_dir, stage)
    if not d.is_dir():
        return []
    out = [CheckpointInfo.read(p) for p in d.glob("step_*") if (p / META).is_file()]
    return sorted(out, key=lambda c: c.step)


def latest(run_dir: str | Path, stage: str) -> Optional[CheckpointInfo]:
    cps = list_checkpoints(run_dir, stage)
    return cps[-1] if cps else None


def at_fraction(run_dir: str | Path, stage: str, fraction: float) -> CheckpointInfo:
    """The checkpoint a later stage starts from; a clear error if it was never saved."""
    cps = list_checkpoints(run_dir, stage)
    for c in cps:
        if any(abs(f - fraction) < 1e-9 for f in c.fractions):
            return c
    have = sorted({f for c in cps for f in c.fractions})
    raise CheckpointError(f"stage {stage!r} has no checkpoint at fraction {fraction} in "
                          f"{stage_dir(run_dir, stage)} (saved fractions: {have or 'none'})")


def _shape_check(sharded: dict, ckpt: Path) -> None:
    """Compare global shapes with the checkpoint's metadata; name the tensor and both shapes."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    try:
        saved = dist_checkpointing.load_tensors_metadata(str(ckpt))
    except Exception as e:  # unreadable metadata is itself the error to report
        raise CheckpointError(f"{ckpt}: cannot read checkpoint metadata ({e})") from None
    for t in nested_values(sharded):
        if isinstance(t, ShardedTensor) and t.key in saved:
            want, have = tuple(t.global_shape), tuple(saved[t.key].global_shape)
            if want != have:
                raise CheckpointError(f"{ckpt}: tensor {t.key} has shape {have} in the checkpoint "
                                      f"but {want} in the model config")
        elif isinstance(t, ShardedTensor) and t.key not in saved and not t.allow_shape_mismatch:
            raise CheckpointError(f"{ckpt}: tensor {t.key} is missing from the checkpoint")


def model_sharded_state(chunks: list) -> dict:
    from megatron.core.utils import unwrap_model

    core = unwrap_model(chunks)
    if len(core) == 1:
        return {"model": core[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(core)}


@contextlib.contextmanager
def _in_process_write_queue():
    """Our saves are synchronous: megatron writes the shards from threads of this process and
    collects their results through a queue. Its default queue lives in a multiprocessing Manager
    (dist_checkpointing/strategies/filesystem_async.py:53-66): a spawned server process per rank
    that costs a second to start and outlives a killed trainer, holding its stdout open. A
    thread-safe queue.Queue does the same job in-process."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    original = fa.get_write_results_queue
    q: queue.Queue = queue.Queue()
    fa.get_write_results_queue = lambda *a, **k: q
    try:
        yield
    finally:
        fa.get_write_results_queue = original


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
            state, is_loading=False, metadata={"distrib_optim_sharding_type": "fully_reshardable"})
    with _in_process_write_queue():
        dist_checkpointing.save(state, str(tmp))
    if write_loader:
        (tmp / "loader").mkdir(exist_ok=True)
        (tmp / "loader" / f"dp{dp_rank}.json").write_text(json.dumps(loader_state))
    dist.barrier()
    if rank0:
        # a checkpoint describes itself: the resolved config and the tokenizer travel with it
        if run_config is not None:
            run_config.dump(tmp / CONFIG)
        if tokenizer is not None and Path(tokenizer).is_file():
            (tmp / "tokenizer").mkdir(exist_ok=True)
            shutil.copy2(tokenizer, tmp / "tokenizer" / Path(tokenizer).name)
        (tmp / META).write_text(json.dumps(meta, indent=1))
        publish(tmp, path)
    dist.barrier()


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


def _prime_optimizer_state(optimizer) -> None:
    """Give every parameter an Adam state with a ``step`` before a load.

    Without apex/TE, megatron's DistributedOptimizer.state_dict (optimizer/distrib_optimizer.py:837)
    reads ``state['step']`` of every parameter, but its init_state_fn for torch's Adam
    (optimizer/__init__.py:588) creates only exp_avg/exp_avg_sq — so loading into a fresh
    optimizer fails. The loaded checkpoint overwrites these placeholders."""
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    for o in inner:
        if getattr(o, "init_state_fn", None) is not None:
            o.init_state_fn(o.optimizer, o.config)
        for group in o.optimizer.param_groups:
            for p in group["params"]:
                o.optimizer.state[p].setdefault("step", torch.tensor(0.0))


@contextlib.contextmanager
def _adam_step_is_not_a_shard():
    """Without apex/TE, megatron's DistributedOptimizer.load_state_dict (distrib_optimizer.py:1025-1032)
    puts torch Adam's scalar ``step`` into every parameter state, and then
    _set_main_param_and_optimizer_states (distrib_optimizer.py:1222) expects a loaded shard for
    every state tensor — ``step`` has none (the loader skips it on purpose at :2390), so loading
    fails with KeyError('step'). Marking it absent lets the shard copy skip it."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def patched(self, model_param, tensors):
        return original(self, model_param, {"step": None, **tensors})

    DistributedOptimizer._set_main_param_and_optimizer_states = patched
    try:
        yield
    finally:
        DistributedOptimizer._set_main_param_and_optimizer_states = original


def _unshare_adam_steps(optimizer) -> None:
    """megatron (distrib_optimizer.py:1029-1032) gives every parameter the *same* ``step`` tensor;
    torch's Adam increments each parameter's step in place, so a shared tensor would advance once
    per parameter per step and corrupt the bias correction after a resume. Give each its own."""
    for o in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in o.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


def _load_module_state(module, part_state: dict, where: Path) -> None:
    """Strict for parameters; an ``_extra_state`` that was not loaded keeps the module's own.

    Transformer Engine modules keep FP8 scaling metadata as ``_extra_state``. TE's core attention
    has one that megatron never puts in its sharded state (extensions/transformer_engine.py:2083,
    like the local DotProductAttention), so no checkpoint — written by the local spec, by
    tools/convert_openlm.py or by TE itself — has it, and a strict load into the TE spec fails.
    TE re-derives the metadata within its amax history."""
    missing, unexpected = module.load_state_dict(part_state, strict=False)
    bad = [k for k in missing if not k.endswith("_extra_state")]
    if bad or unexpected:
        raise CheckpointError(f"{where}: checkpoint does not fit the model (missing {bad[:5]}, "
                              f"unexpected {list(unexpected)[:5]})")


def load(info_path: Path, chunks: list, optimizer=None) -> None:
    """Load model (and optimizer) state in place from a complete checkpoint."""
    from megatron.core import dist_checkpointing
    from megatron.core.utils import unwrap_model

    if not (info_path / META).is_file():
        raise CheckpointError(f"{info_path} is not a complete megavlm checkpoint (no {META})")
    state = model_sharded_state(chunks)
    _shape_check(state, info_path)
    if not _holds_params(optimizer):
        optimizer = None
    if optimizer is not None:
        _prime_optimizer_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(
            state, is_loading=True, metadata={"distrib_optim_sharding_type": "fully_reshardable"})
    loaded = dist_checkpointing.load(state, str(info_path))
    core = unwrap_model(chunks)
    if len(core) == 1:
        _load_module_state(core[0], loaded["model"], info_path)
    else:
        for i, c in enumerate(core):
            _load_module_state(c, loaded[f"model{i}"], info_path)
    if optimizer is not None:
        with _adam_step_is_not_a_shard():
            optimizer.load_state_dict(loaded["optimizer"])
        _unshare_adam_steps(optimizer)


def read_loader_state(path: Path, dp_rank: int) -> dict:
    f = path / "loader" / f"dp{dp_rank}.json"
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


def tokenizer_file(path: Path) -> Path:
    """The tokenizer saved inside a checkpoint; a clear error when there is none."""
    d = Path(path) / "tokenizer"
    files = sorted(d.glob("*")) if d.is_dir() else []
    if not files:
        raise CheckpointError(f"{path}: checkpoint has no tokenizer (expected a file under {d})")
    return files[0]


def load_for_inference(path: str | Path, parallel=None, dtype: Optional[torch.dtype] = None):
    """(model chunks in eval mode, RunConfig) of a checkpoint directory, for one process.

    Builds the model from the checkpoint's own config.yaml; initialises a single-process
    parallel context when none is given.
    """
    from megavlm.config import load_config
    from megavlm.parallel.state import Parallel
    from megavlm.train.loop import build_model

    path = Path(path)
    if not (path / META).is_file():
        raise CheckpointError(f"{path} is not a complete megavlm checkpoint (no {META})")
    if not (path / CONFIG).is_file():
        raise CheckpointError(f"{path}: checkpoint has no {CONFIG}")
    run = load_config(path / CONFIG)
    run.parallel.tp = run.parallel.pp = 1
    run.parallel.vpp, run.parallel.sequence_parallel = None, False
    if parallel is None:
        parallel = Parallel.initialize(run.parallel, run.seed)
    chunks, _ = build_model(run, parallel, dtype or torch.float32)
    load(path, chunks, None)
    for c in chunks:
        c.eval()
    return chunks, run
