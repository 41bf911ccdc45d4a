"""What a megavlm checkpoint is on disk, and reading model weights out of one.

Why apart from megavlm.train.checkpoint: evaluation, export and conversion read checkpoints
without training anything, so finding a checkpoint and loading its model weights must not need
the trainer. Writing (with optimizer and data-loader state), resuming and pruning stay in
megavlm.train.checkpoint.

Layout: ``<run_dir>/<stage>/checkpoints/step_0000080/`` holds the sharded model (and optimizer)
state of megatron-core dist_checkpointing, ``meta.json`` (stage, step, steps, the fractions it
stands for, tokens), ``config.yaml`` (the resolved run config), ``tokenizer/<file>`` and
``loader/dp<r>.json`` (each data-parallel rank's data position). A directory without
``meta.json`` is not a checkpoint (it was never committed).

Sharded tensor keys are global (layer numbers include the pipeline offset, TP shards carry their
offsets), so a checkpoint saved at one TP/PP layout loads at another.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from megavlm.run_folder import CHECKPOINTS, CONFIG, LATEST, META, STEP_PREFIX, TOKENIZER_DIR  # noqa: F401


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
        try:
            m = json.loads((path / META).read_text())
            return cls(path=path, stage=m["stage"], step=m["step"], steps=m["steps"],
                       fractions=tuple(m.get("fractions", [])))
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{path / META}: unreadable checkpoint metadata ({e!r})") from None


def stage_dir(run_dir: str | Path, stage: str) -> Path:
    return Path(run_dir) / stage / CHECKPOINTS


def list_checkpoints(run_dir: str | Path, stage: str) -> list[CheckpointInfo]:
    d = stage_dir(run_dir, stage)
    if not d.is_dir():
        return []
    out = [CheckpointInfo.read(p) for p in d.glob(f"{STEP_PREFIX}*") if (p / META).is_file()]
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


def require_complete(path: Path, *, config: bool = False) -> None:
    """A clear error unless ``path`` is a committed checkpoint (and, with ``config``, has its
    config.yaml)."""
    if not (path / META).is_file():
        raise CheckpointError(f"{path} is not a complete megavlm checkpoint (no {META})")
    if config and not (path / CONFIG).is_file():
        raise CheckpointError(f"{path}: checkpoint has no {CONFIG}")




def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint a user names: a checkpoint itself (``…/checkpoints/step_…``), or the newest
    complete one of a stage (``runs/x/sft``, ``runs/x/sft/checkpoints``, ``runs/x/sft/latest``) or
    of a run (``runs/x``, ``runs/x/latest``: its last stage with a checkpoint, in the order of the
    run's config.yaml). Anything else is a clear "not a checkpoint" error."""
    p = Path(path).expanduser()
    if p.name == LATEST and not (p / META).is_file():
        p = p.parent
    if (p / META).is_file():
        return p
    if not p.exists():
        raise CheckpointError(f"{path}: no such checkpoint, stage or run folder")
    for stage_ckpts in (p, p / CHECKPOINTS):
        if stage_ckpts.is_dir() and stage_ckpts.name == CHECKPOINTS:
            cps = sorted((d for d in stage_ckpts.glob(f"{STEP_PREFIX}*") if (d / META).is_file()), key=lambda d: d.name)
            if cps:
                return cps[-1]
            raise CheckpointError(f"{path}: not a checkpoint, and {stage_ckpts} holds no complete one")
    stages = [d.name for d in sorted(p.iterdir()) if (d / CHECKPOINTS).is_dir()] if p.is_dir() else []
    if stages:
        order = stages
        cfg = p / CONFIG
        if cfg.is_file():
            names = [s.get("name") for s in (yaml.safe_load(cfg.read_text()) or {}).get("stages", [])]
            order = [n for n in names if n in stages] + [n for n in stages if n not in names]
        for st in reversed(order):
            c = latest(p, st)
            if c is not None:
                return c.path
    raise CheckpointError(f"{path}: not a checkpoint (no {META}; pass <run>/<stage>/checkpoints/step_…, "
                          f"a stage folder or a run folder, optionally with /{LATEST})")


def tokenizer_file(path: str | Path) -> Path:
    """The tokenizer saved inside a checkpoint; a clear error when there is none."""
    d = Path(path) / TOKENIZER_DIR
    files = sorted(d.glob("*")) if d.is_dir() else []
    if not files:
        raise CheckpointError(f"{path}: checkpoint has no tokenizer (expected a file under {d})")
    return files[0]


# ------------------------------------------------------------------------- model weights


def model_sharded_state(chunks: list) -> dict:
    """megatron's sharded state of the model chunks under the keys a checkpoint stores them."""
    from megatron.core.utils import unwrap_model

    core = unwrap_model(chunks)
    if len(core) == 1:
        return {"model": core[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(core)}


def shape_check(sharded: dict, ckpt: Path) -> None:
    """Compare global shapes with the checkpoint's metadata; name the tensor and both shapes."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

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


def put_model_state(chunks: list, loaded: dict, where: Path) -> None:
    """Copy the model part of a loaded dist checkpoint into the (possibly DDP-wrapped) chunks."""
    from megatron.core.utils import unwrap_model

    core = unwrap_model(chunks)
    if len(core) == 1:
        _load_module_state(core[0], loaded["model"], where)
    else:
        for i, c in enumerate(core):
            _load_module_state(c, loaded[f"model{i}"], where)


def load_model_weights(path: Path, chunks: list) -> None:
    """Load the model weights of a complete checkpoint into the chunks in place (collective over
    the ranks that hold the chunks), at whatever layout the chunks were built."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    require_complete(path)
    state = model_sharded_state(chunks)
    shape_check(state, path)
    put_model_state(chunks, dist_checkpointing.load(state, str(path)), path)
