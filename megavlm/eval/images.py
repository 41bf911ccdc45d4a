"""Benchmark images -> the checkpoint's image embeddings: its recorded encoder and a cached store.

A checkpoint's projector was trained on one frozen encoder's embeddings, so a benchmark's images
must go through that encoder, at that image size. The record is the run's config
(``model.vision.encoder``; the width and patch count of ``model.vision``) together with the
metadata of its training caption store when that file is still reachable (which also gives the
image size); without either there is no way to know the encoder, and that is an error rather
than a guess. The encoder built from the record must reproduce the config's patch count and
width, else the record is wrong and is refused.

The resize mode (letterbox / square) comes from the same record: the training store's metadata,
else ``model.vision.resize``; neither is an error. Images of one folder are encoded once into
``<data root>/.megavlm-cache/<encoder>-<size>px-<resize>/<folder>.embeds`` (keys: paths relative to
the folder), reused by every task that reads the folder and by later runs; a run that needs images
the store lacks re-encodes the folder's union; a cache store there made another way is an error.
Encoding uses the data pipeline's own code (megavlm.encoders).
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
from pathlib import Path
from typing import Iterable, Optional

from megavlm.data.indexed import DataError, EmbeddingStore
from megavlm.encoders import ImageRecord, encode_images, make_encoder
from megavlm.eval.runner import CheckpointModel, EvalError
from megavlm.eval.vision import ImageBank, training_encoder

CACHE_DIR = ".megavlm-cache"


def recorded_encoder(model: CheckpointModel) -> tuple[str, Optional[int]]:
    """(encoder spec for megavlm.encoders.make_encoder, image size or None) of a checkpoint."""
    name, size, _ = recorded_encoding(model)
    return name, size


def recorded_encoding(model: CheckpointModel) -> tuple[str, Optional[int], str]:
    """(encoder spec, image size or None, resize mode) the checkpoint's training stores were made
    with: the training caption store's metadata first (a store from before the resize record counts
    as square, as training counts it), else the config (``model.vision.encoder`` / ``.resize``).
    A resize setting recorded by neither is an error: a letterbox-trained projector must not be
    scored on stretched images, nor the reverse."""
    v = model.run.model.vision
    trained = training_encoder(model.run) or {}
    name = v.encoder or trained.get("encoder")
    if not name:
        raise EvalError(f"checkpoint {model.path} records no image encoder: its config has no "
                        f"model.vision.encoder and its training caption store is not reachable "
                        f"(data.captions {list(model.run.data.captions)}); set model.vision.encoder "
                        f"in the run config or evaluate from stored embeddings (--task … --embeds …)")
    if trained and v.encoder and trained.get("encoder") and trained["encoder"] != _hub_name(v.encoder) \
            and trained["encoder"] != v.encoder:
        raise EvalError(f"checkpoint {model.path}: model.vision.encoder={v.encoder!r} but its training store "
                        f"was encoded with {trained['encoder']!r}")
    cfg_resize = getattr(v, "resize", None)
    if trained:
        resize = trained.get("resize") or "square"
        if cfg_resize and cfg_resize != resize:
            raise EvalError(f"checkpoint {model.path}: model.vision.resize={cfg_resize} but its training store "
                            f"was resized {resize}")
    elif cfg_resize:
        resize = cfg_resize
    else:
        raise EvalError(f"checkpoint {model.path} records no image resize setting: its training caption store "
                        f"(data.captions {list(model.run.data.captions)}) is not reachable and its config has no "
                        f"model.vision.resize; set model.vision.resize (letterbox or square, as "
                        f"tools/encode_images.py --resize made its stores)")
    size = trained.get("image_size")
    if name == "efficientnet-lite0" and size is None:  # a grid of (size / 32)^2 patches
        side = math.isqrt(v.num_patches)
        if side * side != v.num_patches:
            raise EvalError(f"checkpoint {model.path}: {v.num_patches} patches is not a square grid "
                            f"of efficientnet-lite0")
        size = 32 * side
    return _hub_name(name), size, resize


def _hub_name(name: str) -> str:
    return f"siglip:google/{name}" if name.startswith("siglip-") else name  # the config's short name


def load_encoder(model: CheckpointModel):
    """The checkpoint's encoder (megavlm.encoders), checked against the config's shape; its
    ``resize`` attribute is the resize mode its training stores were made with."""
    spec, size, resize = recorded_encoding(model)
    try:
        # efficientnet-lite-pytorch prints its loading message: keep stdout for the JSON summary
        with contextlib.redirect_stdout(sys.stderr):
            enc = make_encoder(spec, size)
    except (ValueError, RuntimeError, OSError) as e:
        raise EvalError(f"checkpoint {model.path}: cannot build its image encoder {spec!r} ({e})") from None
    v = model.run.model.vision
    if (enc.num_patches, enc.embed_dim) != (v.num_patches, v.embed_dim):
        raise EvalError(f"checkpoint {model.path}: encoder {enc.name} at {enc.image_size}px gives "
                        f"{enc.num_patches} patches of width {enc.embed_dim}, but the projector expects "
                        f"{v.num_patches} x {v.embed_dim}")
    enc.resize = resize
    return enc


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "root"


def _encoding(encoder) -> tuple[str, int, str]:
    return encoder.name, encoder.image_size, getattr(encoder, "resize", "square")


def cache_prefix(data_root: Path, encoder, folder: Path) -> Path:
    """``<root>/.megavlm-cache/<encoder>-<size>px-<resize>/<folder relative to root>.embeds``."""
    try:
        rel = folder.resolve().relative_to(data_root.resolve())
    except ValueError:
        rel = Path(folder.name)
    name, size, resize = _encoding(encoder)
    return data_root / CACHE_DIR / f"{_slug(name)}-{size}px-{resize}" / f"{_slug(str(rel))}.embeds"


def _cached_meta(prefix: Path, encoder):
    """The cache store's metadata, or None where there is none; a store at this (keyed) place made
    another way is an error, not something to overwrite."""
    if not Path(f"{prefix}.json").is_file():
        return None
    try:
        m = EmbeddingStore(prefix).meta
    except DataError:
        return None  # an unfinished or damaged cache: rebuilt
    have = (m.encoder, m.image_size, getattr(m, "resize", "square") or "square")
    if have != _encoding(encoder):
        raise EvalError(f"{prefix}: cached embeddings were made by {have[0]} at {have[1]}px, {have[2]}, but this "
                        f"checkpoint's images are encoded by {'{} at {}px, {}'.format(*_encoding(encoder))}; "
                        f"remove the folder {prefix.parent}")
    return m


def cached_bank(data_root: str | Path, folder: str | Path, keys: Iterable[str], encoder,
                progress: bool = False) -> ImageBank:
    """An ImageBank of ``keys`` (paths relative to ``folder``), encoding them (with the encoder's
    ``resize``) when the cache lacks any. The cache is keyed on encoder, image size and resize."""
    root, folder = Path(data_root), Path(folder)
    prefix = cache_prefix(root, encoder, folder)
    want = set(keys)
    m = _cached_meta(prefix, encoder)
    if m is None or not want <= set(m.keys or ()):
        have = {k for k in (m.keys or ()) if (folder / k).is_file()} if m is not None else set()
        todo = sorted(want | have)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        out = Path(str(prefix)[:-len(".embeds")])
        try:
            encode_images([ImageRecord(folder / k, k, None, str(folder / k)) for k in todo], out, encoder,
                          decoder="pil", progress=progress, resize=getattr(encoder, "resize", "square"))
        except DataError as e:
            raise EvalError(f"encoding the images of {folder}: {e}") from None
    return ImageBank(prefix)
