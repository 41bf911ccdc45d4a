"""Benchmark images -> the checkpoint's image embeddings: its recorded encoder and a cached store.

A checkpoint's projector was trained on one frozen encoder's embeddings, so a benchmark's images
must go through that encoder, at that image size. The record is the run's config
(``model.vision.encoder``; the width and patch count of ``model.vision``) together with the
metadata of its training caption store when that file is still reachable (which also gives the
image size); without either there is no way to know the encoder, and that is an error rather
than a guess. The encoder built from the record must reproduce the config's patch count and
width, else the record is wrong and is refused.

Images of one folder are encoded once into ``<data root>/.megavlm-cache/<encoder>-<size>px/
<folder>.embeds`` (keys: paths relative to the folder), reused by every task that reads the
folder and by later runs; a run that needs images the store lacks re-encodes the folder's union.
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
    v = model.run.model.vision
    trained = training_encoder(model.run) or {}
    name = v.encoder or trained.get("encoder")
    if not name:
        raise EvalError(f"checkpoint {model.path} records no image encoder: its config has no "
                        f"model.vision.encoder and its training caption store is not reachable "
                        f"(data.captions {list(model.run.data.captions)}); set model.vision.encoder "
                        f"in the run config or evaluate from stored embeddings (--task … --embeds …)")
    size = trained.get("image_size")
    if name == "efficientnet-lite0" and size is None:  # a grid of (size / 32)^2 patches
        side = math.isqrt(v.num_patches)
        if side * side != v.num_patches:
            raise EvalError(f"checkpoint {model.path}: {v.num_patches} patches is not a square grid "
                            f"of efficientnet-lite0")
        size = 32 * side
    if name.startswith("siglip-"):  # the config's short name of a hub SigLIP
        name = f"siglip:google/{name}"
    return name, size


def load_encoder(model: CheckpointModel):
    """The checkpoint's encoder (megavlm.encoders), checked against the config's shape."""
    spec, size = recorded_encoder(model)
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
    return enc


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "root"


def cache_prefix(data_root: Path, encoder, folder: Path) -> Path:
    """``<root>/.megavlm-cache/<encoder>-<size>px/<folder relative to root>.embeds``."""
    try:
        rel = folder.resolve().relative_to(data_root.resolve())
    except ValueError:
        rel = Path(folder.name)
    return data_root / CACHE_DIR / f"{_slug(encoder.name)}-{encoder.image_size}px" / f"{_slug(str(rel))}.embeds"


def _covers(prefix: Path, encoder, keys: set[str]) -> bool:
    if not Path(f"{prefix}.json").is_file():
        return False
    try:
        m = EmbeddingStore(prefix).meta
    except DataError:
        return False
    return (m.encoder, m.image_size) == (encoder.name, encoder.image_size) and keys <= set(m.keys or ())


def cached_bank(data_root: str | Path, folder: str | Path, keys: Iterable[str], encoder,
                progress: bool = False) -> ImageBank:
    """An ImageBank of ``keys`` (paths relative to ``folder``), encoding them when the cache lacks any."""
    root, folder = Path(data_root), Path(folder)
    prefix = cache_prefix(root, encoder, folder)
    want = set(keys)
    if not _covers(prefix, encoder, want):
        have: set[str] = set()
        if Path(f"{prefix}.json").is_file():
            try:
                m = EmbeddingStore(prefix).meta
                if (m.encoder, m.image_size) == (encoder.name, encoder.image_size):
                    have = {k for k in (m.keys or ()) if (folder / k).is_file()}
            except DataError:
                pass
        todo = sorted(want | have)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        out = Path(str(prefix)[:-len(".embeds")])
        try:
            encode_images([ImageRecord(folder / k, k, None, str(folder / k)) for k in todo], out, encoder,
                          decoder="pil", progress=progress)
        except DataError as e:
            raise EvalError(f"encoding the images of {folder}: {e}") from None
    return ImageBank(prefix)
