"""One WebDataset tar shard -> one part of an embedding store (+ caption tokens).

The input side of parallel image encoding (megavlm.prep.parts): the shard is read whole through
megavlm.prep.readers.webdataset (a shard is ~10k images), every caption tokenized and every image
header checked BEFORE the encoder runs, so a bad member stops the part before work is spent on it
(or, with the skip policy, is dropped and listed). The part's files are written under temporary
names and renamed; its ``done.json`` comes after (parts.run_parts).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from megavlm.data.indexed import DataError, EmbeddingWriter, IndexedWriter, token_dtype
from megavlm.prep.readers.webdataset import CaptionRule, read_tar_shard


def _image_ok(data: bytes) -> Optional[str]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return str(e)
    return None


def encode_tar_part(shard: Path, prefix: Path, reject: Optional[Callable[[str], None]], *, encoder,
                    decode, tokenizer=None, rule: Optional[CaptionRule] = None, dtype: str = "bfloat16",
                    batch_size: int = 32, resize: str = "square", source: Optional[dict] = None) -> int:
    """Encode one shard into ``<prefix>.embeds`` (+ ``<prefix>.{bin,idx}`` caption tokens)."""
    captions = tokenizer is not None
    samples = read_tar_shard(shard, (rule or CaptionRule()) if captions else None, reject)

    def problem(msg: str) -> bool:
        if reject is None:
            raise DataError(msg)
        reject(msg)
        return False

    keep, toks = [], []
    for s in samples:  # the whole shard is checked before the encoder runs
        ids: list[int] = []
        if captions:
            ids = tokenizer.encode(s.caption)
            if not ids and not problem(f"{s.where}: caption {s.caption!r} tokenizes to nothing"):
                continue
        err = _image_ok(s.image)
        if err is not None and not problem(f"{s.where}: cannot decode image ({err})"):
            continue
        keep.append(s)
        toks.append(ids)
    with EmbeddingWriter(f"{prefix}.embeds", encoder=encoder.name, num_patches=encoder.num_patches,
                         embed_dim=encoder.embed_dim, dtype=dtype, image_size=encoder.image_size,
                         resize=resize, source=source) as ew:
        tw = IndexedWriter(prefix, token_dtype(tokenizer.vocab_size)) if captions else None
        try:
            for lo in range(0, len(keep), batch_size):
                chunk, ids = keep[lo:lo + batch_size], toks[lo:lo + batch_size]
                if reject is None:
                    pixels, ok = decode([s.image for s in chunk], [s.where for s in chunk]), list(range(len(chunk)))
                else:
                    pixels, ok = [], []
                    for j, s in enumerate(chunk):
                        try:
                            pixels.extend(decode([s.image], [s.where]))
                            ok.append(j)
                        except (DataError, RuntimeError) as e:
                            reject(str(e))
                if not ok:
                    continue
                emb = encoder(np.stack(pixels))
                for e, j in zip(emb, ok):
                    ew.add(e, chunk[j].key)
                    if tw is not None:
                        tw.add(ids[j])
        except BaseException:
            if tw is not None:
                tw.abort()
            raise
        if tw is not None:
            tw.close()
        return ew._w.count


class OnDevice:
    """The frozen encoder on this worker's device (``cuda:LOCAL_RANK``, as torchrun sets it): pixels
    are normalised on the CPU as the encoder does, moved over, encoded (under bf16 autocast when
    ``compute_dtype`` is ``bfloat16``), and the embeddings come back as float32 on the CPU for the
    writer. On an H200 a SigLIP so400m/14@384 tower encodes 64 images/s in fp32 and 442 in bf16
    autocast (benchmarks/2026-12-04-h200-encode.md)."""

    def __init__(self, encoder, device, compute_dtype: str = "float32"):
        self.inner, self.device, self.compute_dtype = encoder, device, compute_dtype
        self.__dict__.update({k: getattr(encoder, k) for k in ("name", "image_size", "num_patches", "embed_dim",
                                                                "mean", "std")})
        encoder.model.to(device)

    def __call__(self, images: np.ndarray):
        import torch

        bf16 = self.compute_dtype == "bfloat16"
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            x = self.inner._normalize(images).to(self.device, non_blocking=True)
            return self.inner._forward(x).float().cpu()


COMPUTE_DTYPES = ("float32", "bfloat16")


def on_worker_device(encoder, compute_dtype: str = "float32"):
    """``encoder`` on this worker's GPU, computing in ``compute_dtype``; without CUDA the encoder
    itself in float32 (or on the CPU under bf16 autocast when asked for)."""
    import os

    import torch

    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype {compute_dtype!r} is not one of {list(COMPUTE_DTYPES)}")
    if not torch.cuda.is_available():
        return encoder if compute_dtype == "float32" else OnDevice(encoder, torch.device("cpu"), compute_dtype)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    return OnDevice(encoder, torch.device("cuda", local), compute_dtype)
