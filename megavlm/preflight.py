"""Fail early: everything every stage of a recipe will need, checked before the first step.

Why: a recipe's later stages read data and checkpoints the first stage never touches, so a
missing instruction set or a store encoded at the wrong width used to surface hours into a run
(after the text stage had trained). ``check_run`` opens every data set of every stage exactly
as the stage loaders will (index/bin consistency, embedding width, patch count, encoder, resize
setting, tokenizer vocabulary against the model's), checks the init checkpoints that must exist
already (``init.path``; ``init.stage`` checkpoints are made by earlier stages of the same run),
that the run folder can be written and that its disk holds the first checkpoint — and returns
one line per problem, naming the file and what is wrong, all of them at once. It reads only:
nothing is created, so a failed check leaves no run folder behind.

Callers: ``megavlm train`` (and ``megavlm train --check``, which does only this) before the run
folder is touched, and ``megavlm.train.stages.run_stages`` for library users.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Optional

import yaml

from megavlm.config import RunConfig
from megavlm.data.indexed import DataError
from megavlm.run_folder import CONFIG, RECORDED_DATA  # noqa: F401  (RECORDED_DATA: re-exported)
from megavlm.train.plan import loader_spec

KINDS = ("text", "captions", "instructions")
BYTES_PER_PARAM = 16
"""Checkpoint bytes per parameter: fp32 weights (4) + fp32 main copy (4) + Adam's two moments
(8). An over-estimate for bf16 weights, on purpose: the check must not pass a disk that then fills."""
_SHAPE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size", "qk_norm")


class PreflightError(DataError):
    """The recipe cannot run; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str], hint: Optional[str] = None):
        self.problems = list(problems)
        super().__init__(f"{len(problems)} problem(s) before training:\n  " + "\n  ".join(problems)
                         + (f"\n{hint}" if hint else ""))


def parameter_count(run: RunConfig) -> int:
    """Parameters of the whole model (all pipeline stages and TP shards together)."""
    from megavlm.model.memory import Layout, inventory

    return sum(p.numel for p in inventory(run.model, Layout(), 0))


def checkpoint_bytes(run: RunConfig) -> int:
    """Upper estimate of one checkpoint's size on disk (model + optimizer state)."""
    return parameter_count(run) * BYTES_PER_PARAM


def _existing_ancestor(p: Path) -> Path:
    p = p.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output(run: RunConfig) -> list[str]:
    """The run folder can be created/written and its disk holds the first checkpoint."""
    out = Path(run.run_dir).expanduser()
    base = _existing_ancestor(out)
    if not base.is_dir():
        return [f"{base}: run_dir {out} lies under a file, not a folder"]
    if not os.access(base, os.W_OK | os.X_OK):
        return [f"{base}: not writable (run_dir {out})"]
    need = checkpoint_bytes(run)
    free = shutil.disk_usage(base).free
    if free < need:
        return [f"{base}: {free / 2**30:.2f} GiB free, the first checkpoint needs about "
                f"{need / 2**30:.2f} GiB ({parameter_count(run):,} parameters x {BYTES_PER_PARAM} bytes)"]
    return []


def check_tokenizer(run: RunConfig) -> tuple[list[str], object]:
    from megavlm.data.tokenizer import TokenizerError, load_tokenizer

    path = run.data.resolve(run.data.tokenizer)
    if not path.is_file():
        return [f"{path}: missing (data.tokenizer; train one with tools/train_tokenizer.py)"], None
    try:
        tok = load_tokenizer(path)
    except (TokenizerError, DataError, OSError, RuntimeError) as e:
        return [f"{path}: not a loadable tokenizer ({e})"], None
    if tok.vocab_size > run.model.vocab_size:
        return [f"{path}: tokenizer has {tok.vocab_size} ids but model.vocab_size={run.model.vocab_size}"], tok
    return [], tok


def check_data(run: RunConfig) -> list[str]:
    """Open every set of every stage's mixture as the stage loader will; one line per bad set."""
    from megavlm.data.mixture import check_resize
    from megavlm.data.sources import CaptionSource, ConversationSource, TextSource

    problems, tok = check_tokenizer(run)
    d, v = run.data, run.model.vision
    opened: dict[tuple[str, str, int], object] = {}
    for st in run.stages:
        spec = loader_spec(run, st)  # the stage's own row length, as its loader will read the sets
        kw = dict(embed_dim=v.embed_dim, num_patches=v.num_patches, seq_length=spec.seq_length,
                  too_long=d.too_long, encoder=v.encoder)
        stage_sources = []
        for kind in KINDS:
            if getattr(spec.mixture, kind) <= 0:
                continue
            names = getattr(d, kind)
            if not names:
                problems.append(f"stage {st.name}: mixture.{kind}={getattr(st.mixture, kind)} but "
                                f"data.{kind} lists no dataset")
                continue
            for name in names:
                prefix = d.resolve(name)
                key = (kind, str(prefix), spec.seq_length if kind != "text" else 0)
                if key not in opened:
                    try:
                        if kind == "text":
                            src = TextSource([prefix])
                            if tok is not None:
                                _check_token_ids(src, run.model.vocab_size, prefix)
                        elif tok is None:  # the sources need a tokenizer (reported above): check the files
                            from megavlm.data.indexed import EmbeddingStore, TokenData

                            TokenData(prefix)
                            if kind == "captions":
                                EmbeddingStore(f"{prefix}.embeds", embed_dim=v.embed_dim,
                                               num_patches=v.num_patches, encoder=v.encoder)
                            else:
                                TokenData(f"{prefix}.mask")
                            src = None
                        else:
                            cls = CaptionSource if kind == "captions" else ConversationSource
                            src = cls(prefix, tok, **kw)
                    except (DataError, OSError, ValueError, KeyError) as e:
                        msg = str(e) if str(prefix) in str(e) else f"{prefix}: {e}"
                        problems.append(f"{msg} [data.{kind} {name!r}, stage {st.name}]")
                        src = None
                    opened[key] = src
                if opened[key] is not None and kind != "text":
                    stage_sources.append(_Parts(opened[key]))
        try:
            check_resize(stage_sources, st.name)
        except DataError as e:
            problems.append(str(e))
    return problems


class _Parts:
    """One source seen as the ConcatSource check_resize expects."""

    def __init__(self, src):
        self.parts = [src]


SCAN_BYTES = 256 << 20
"""Token files up to this size are scanned for ids outside the model's vocabulary (larger ones are
trusted to the tokenizer check: a full scan of a paper-scale corpus would take minutes)."""


def _check_token_ids(src, vocab_size: int, prefix: Path) -> None:
    import numpy as np

    from megavlm.data.indexed import bin_path

    for part in src.parts:
        bp = bin_path(part.prefix)
        if bp.stat().st_size > SCAN_BYTES or not len(part):
            continue
        top = int(np.memmap(bp, mode="r", dtype=part._ds.index.dtype).max(initial=0))
        if top >= vocab_size:
            raise DataError(f"{bp}: token id {top} >= model.vocab_size={vocab_size} "
                            f"(tokenized with another tokenizer?)")


def check_init(run: RunConfig) -> list[str]:
    """``init.path`` checkpoints exist, are complete and have this model's shape."""
    from megavlm.checkpoint_format import CONFIG, META

    problems = []
    for st in run.stages:
        if st.init.path is None:
            continue
        p = Path(st.init.path).expanduser()
        if not p.is_dir():
            problems.append(f"{p}: missing (init.path of stage {st.name})")
            continue
        if not (p / META).is_file():
            problems.append(f"{p}: not a complete megavlm checkpoint, no {META} (init.path of stage {st.name})")
            continue
        cfg = p / CONFIG
        if not cfg.is_file():
            continue  # imported checkpoints may carry only weights; the loader checks shapes
        try:
            model = (yaml.safe_load(cfg.read_text()) or {}).get("model", {})
        except yaml.YAMLError as e:
            problems.append(f"{cfg}: unreadable ({e}) (init.path of stage {st.name})")
            continue
        diff = [f"{k}={model.get(k)} (recipe {getattr(run.model, k)})" for k in _SHAPE_KEYS
                if k in model and model[k] != getattr(run.model, k)]
        vis = model.get("vision") or {}
        if vis and vis.get("embed_dim") not in (None, run.model.vision.embed_dim):
            diff.append(f"vision.embed_dim={vis['embed_dim']} (recipe {run.model.vision.embed_dim})")
        if diff:
            problems.append(f"{p}: checkpoint has another shape: {', '.join(diff)} (init.path of stage {st.name})")
    return problems


def check_run(run: RunConfig, *, output: bool = True) -> list[str]:
    """Every problem the recipe would meet, one line each (empty: ready to train). Reads only."""
    problems = check_demo_sets(run) + check_data(run) + check_init(run) + check_sinks(run)
    if output:
        problems += check_output(run)
    return list(dict.fromkeys(problems))


def check_demo_sets(run: RunConfig) -> list[str]:
    """With ``data.build: demo``, a set name the demo builder does not make (a typo)."""
    if run.data.build != "demo":
        return []
    from megavlm.config import ConfigError
    from megavlm.demo.corpus import check_set_names

    try:
        check_set_names(run.data)
    except ConfigError as e:
        return [str(e)]
    return []


def check_sinks(run: RunConfig) -> list[str]:
    """A TensorBoard / W&B sink the recipe asks for whose package is not installed."""
    from megavlm.config import ConfigError
    from megavlm.sinks import check_available

    try:
        check_available(run)
    except ConfigError as e:
        return [str(e)]
    return []


def require_ready(run: RunConfig, *, output: bool = True, hint: Optional[str] = None) -> None:
    """Raise PreflightError listing every problem (``hint``: what to run, appended as a line)."""
    problems = check_run(run, output=output)
    if problems:
        raise PreflightError(problems, hint)


# ------------------------------------------------------------------ an existing run folder


def non_identity_keys() -> tuple[str, ...]:
    """Dotted keys (``*`` for every stage) a re-run may change without refusing to skip or resume:
    the config sections that declare ``IDENTITY = False`` (parallel layout, guard, preemption,
    logging) and the fields marked ``NOT_IDENTITY`` (run_dir, data.root, train.micro_batch_size,
    stages.*.save_every, eval) — where things are written or logged and how often, how checkpoints
    are scored, the guards of a running
    job, where the data lies (its content is compared separately, by fingerprint), and the layout
    (checkpoints reshard; the global batch stays the same). Read from megavlm.config's dataclasses."""
    import dataclasses
    import typing

    out: list[str] = []

    def walk(cls, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = prefix + f.name
            if not f.metadata.get("identity", True):
                out.append(key)
                continue
            tp = hints[f.name]
            if typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
                walk(typing.get_args(tp)[0], key + ".*.")
            elif dataclasses.is_dataclass(tp):
                if getattr(tp, "IDENTITY", True):
                    walk(tp, key + ".")
                else:
                    out.append(key)

    walk(RunConfig, "")
    return tuple(out)


ADDED_DEFAULTS = {"stages.*.text_attention": "document"}
"""Keys added since a run folder may have been recorded, with the behaviour every older run had:
a recorded config without the key equals a current one holding that value (so an older run folder
still resumes), and any other value is a change that refuses it (issue 25: ``window`` text rows
attend differently from the ``document`` rows an older run trained with)."""


def _added_default(key: str) -> object:
    import fnmatch

    for pattern, value in ADDED_DEFAULTS.items():
        if fnmatch.fnmatchcase(key, pattern):
            return value
    return "<unset>"


class RunFolderError(DataError):
    """The run folder holds checkpoints of another config or other data."""


def _flatten(obj, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    elif isinstance(obj, list) and prefix == "stages.":
        for i, st in enumerate(obj):
            name = st.get("name", i) if isinstance(st, dict) else i
            out.update(_flatten(st, f"stages.{name}."))
    else:
        out[prefix[:-1]] = obj
    return out


def _ignored(key: str) -> bool:
    import fnmatch

    return any(key == k or fnmatch.fnmatchcase(key, k) or fnmatchcase_prefix(key, k) for k in non_identity_keys())


def fnmatchcase_prefix(key: str, pattern: str) -> bool:
    import fnmatch

    return fnmatch.fnmatchcase(key, pattern + ".*")


def config_differences(recorded: dict, current: dict) -> list[str]:
    """Dotted keys whose values differ (:func:`non_identity_keys` left out), as 'key: old -> new'.
    A ``recorded`` config of the old layout (one train section) is read in the new one."""
    from megavlm.config import migrate_legacy

    a, b = _flatten(migrate_legacy(copy.deepcopy(recorded), warn=False)), _flatten(current)
    out = []
    for k in sorted(set(a) | set(b)):
        if _ignored(k) or a.get(k, "<unset>") == b.get(k, "<unset>"):
            continue
        if k not in a and b[k] is None:
            continue  # a field added since (default None) is not a change
        if k not in a and b[k] == _added_default(k):
            continue  # a field added since, at the value older runs had (ADDED_DEFAULTS)
        out.append(f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}")
    return out


def data_fingerprint(run: RunConfig) -> dict[str, dict]:
    """What every data set of the recipe holds: per file its size, and for the small files (index,
    metadata, image references) a content hash; a moved copy has the same fingerprint."""
    from megavlm.data.indexed import file_record

    d = run.data
    files = [d.resolve(d.tokenizer)]
    for kind in KINDS:
        for name in getattr(d, kind):
            p = d.resolve(name)
            files += sorted(p.parent.glob(p.name + ".*")) if p.parent.is_dir() else []
    out: dict[str, dict] = {}
    root = Path(d.root).expanduser()
    for f in files:
        if not f.is_file() or f.name.endswith((".tmp", ".lock")) or f.suffix == ".shards":
            continue
        rec = file_record(f)
        try:
            key = str(f.relative_to(root))
        except ValueError:
            key = str(f)
        out[key] = rec
    return out


def _has_checkpoints(run_dir: Path, stages: list[str]) -> bool:
    from megavlm.checkpoint_format import list_checkpoints

    return any(list_checkpoints(run_dir, s) for s in stages)


def check_run_folder(run: RunConfig) -> list[str]:
    """Why the run folder's checkpoints belong to another config or other data (empty: none, or
    the folder holds no checkpoint yet). The recorded ``config.yaml`` and ``data.json`` are those
    written by the run that made the checkpoints."""
    rd = Path(run.run_dir).expanduser()
    cfg = rd / CONFIG
    if not cfg.is_file() or not _has_checkpoints(rd, [s.name for s in run.stages]):
        return []
    try:
        recorded = yaml.safe_load(cfg.read_text()) or {}
    except yaml.YAMLError as e:
        return [f"{cfg}: unreadable ({e})"]
    out = [f"config {k}" for k in config_differences(recorded, run.to_dict())]
    data_rec = rd / RECORDED_DATA
    if data_rec.is_file():
        import json

        old = json.loads(data_rec.read_text())
        new = data_fingerprint(run)
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        out += [f"data {k}: {'changed' if k in old and k in new else ('new' if k in new else 'gone')}"
                for k in changed]
    return out


def require_same_run(run: RunConfig) -> None:
    """Refuse to skip finished stages or resume when the run folder was made by another config or
    other data; ``megavlm train --force-config`` (run_stages(force_config=True)) overrides."""
    diff = check_run_folder(run)
    if diff:
        raise RunFolderError(
            f"{Path(run.run_dir).expanduser()} holds checkpoints of another config or other data; "
            f"refusing to skip or resume ({'; '.join(diff)}). Use another run_dir, or pass "
            f"--force-config to continue with the new settings")


def record_run(run: RunConfig, data: bool = True) -> None:
    """Write ``config.yaml`` and (``data``: the run reads ``run.data``, not test loaders) the data
    fingerprint into the run folder (temp name, rename)."""
    import json

    rd = Path(run.run_dir).expanduser()
    rd.mkdir(parents=True, exist_ok=True)
    run.dump(rd / CONFIG)
    if not data:
        return
    tmp = rd / (RECORDED_DATA + ".tmp")
    tmp.write_text(json.dumps(data_fingerprint(run), indent=1, sort_keys=True))
    tmp.replace(rd / RECORDED_DATA)
