"""Megatron-core compatible indexed files: token datasets and 16-bit image-embedding stores.

Token datasets are plain megatron-core ``.bin``/``.idx`` pairs (``IndexedDataset``), so files made
here load in Megatron and vice versa. An embedding store is the same pair holding one record of
``num_patches * embed_dim`` values per image plus a ``.json`` metadata file. megatron-core has no
16-bit float dtype, so bf16/fp16 embeddings are stored as their uint16 *bit pattern*, which
round-trips exactly; the metadata says which float type the bits are.

Readers are loud: a missing, truncated or mismatched pair, a store whose width or patch count
disagrees with the config, and non-finite embeddings are errors naming the file and record.
Writers never leave half-written output: they write temporary names and rename at the end.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from megavlm.run_folder import EMBEDS_META

FORMAT = "megavlm-embeds/1"
_IDX_HEADER = b"MMIDIDX\x00\x00"
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
FP8 = "float8_e4m3"
"""8-bit store: per patch row a float32 scale (row amax / 448) then the row in e4m3 (torch's
float8_e4m3fn). A record is ``P*4`` scale bytes then ``P*D`` fp8 bytes (uint8 in the .bin), half a
bf16 store's size; reading upcasts to bf16 (see :func:`fp8_decode`)."""
FP8_MAX = 448.0
STORE_DTYPES = (*_DTYPES, FP8)
_EXP_MASK = {"bfloat16": np.uint16(0x7F80), "float16": np.uint16(0x7C00)}


class DataError(ValueError):
    """Bad or inconsistent data on disk (the message names the file and the record)."""


def _megatron():
    import warnings

    with warnings.catch_warnings():  # megatron.core warns about missing TE/apex on import
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset as mi  # heavy import: only when needed
    # megatron's logging asks for the rank on every dataset open/write and, in a process that is no
    # distributed job (a tool, a test), warns that it defaults to rank 0 — at each call site, so
    # twice per tool run. Such a process is rank 0; say nothing.
    warnings.filterwarnings("ignore", message="Could not determine rank from torch.distributed",
                            category=UserWarning)
    return mi


def bin_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.bin")


def idx_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.idx")


def store_prefix(path: str | Path) -> Path:
    """The embedding store a user names, in either spelling: the caption set's prefix
    (``data/captions``, as ``tools/encode_images.py --output`` takes it) or the store's own
    (``data/captions.embeds``, whose metadata is ``data/captions.embeds.json``). Every tool and
    the evaluation resolve ``--embeds`` through this one function."""
    p = Path(path)
    if p.name.endswith(".json") and Path(str(p)[:-5] + ".idx").is_file():
        p = Path(str(p)[:-5])  # the metadata file itself
    if Path(f"{p}.json").is_file() or p.name.endswith(".embeds"):
        return p
    if Path(f"{p}{EMBEDS_META}").is_file():
        return Path(f"{p}.embeds")
    return p


HASH_BYTES = 64 << 20
"""Files up to this size get a content hash in a manifest record; larger ones only their size."""


def file_record(path: str | Path) -> dict:
    """What a manifest records of a prepared file: its size and, for small files (indexes, metadata,
    image references, tokenizers), the sha256 of its content; two copies of a set match."""
    import hashlib

    p = Path(path)
    size = p.stat().st_size
    rec: dict = {"size": size}
    if size <= HASH_BYTES and not p.name.endswith(".bin"):
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        rec["sha256"] = h.hexdigest()
    return rec


def store_fingerprint(prefix: str | Path) -> str:
    """The identity of an embedding store ``<prefix>.{bin,idx,json}``: sha256 over its metadata
    (keys, encoder, count, ...), its index and its embeddings — all of them for a ``.bin`` up to
    HASH_BYTES, else its size and 64 evenly spaced 1 MiB blocks. Conversation sets record it so a
    store re-encoded with other contents is detected (megavlm.data.sources.ConversationSource)."""
    import hashlib

    prefix = Path(prefix)
    h = hashlib.sha256()
    for suffix in (".json", ".idx"):
        h.update(Path(f"{prefix}{suffix}").read_bytes())
    binp = Path(f"{prefix}.bin")
    size = binp.stat().st_size
    h.update(str(size).encode())
    with open(binp, "rb") as f:
        if size <= HASH_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            for k in range(64):
                f.seek((size - (1 << 20)) * k // 63)
                h.update(f.read(1 << 20))
    return "sha256:" + h.hexdigest()


def token_dtype(vocab_size: int) -> type:
    """uint16 when every id fits, int32 otherwise."""
    return np.uint16 if vocab_size <= 65536 else np.int32


# --------------------------------------------------------------------------------------------
# writing


class IndexedWriter:
    """Writes one ``.bin``/``.idx`` pair record by record (one record = one megatron document).

    Use as a context manager: on success the temporary files are renamed into place, on an
    exception they are removed and nothing appears under the final names.
    """

    def __init__(self, prefix: str | Path, dtype: type):
        self.prefix = Path(prefix)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(dtype).type
        self._tmp = self.prefix.with_name(f".{self.prefix.name}.tmp{os.getpid()}")
        self._builder = _megatron().IndexedDatasetBuilder(str(bin_path(self._tmp)), dtype=self.dtype)
        self.count = 0
        self.tokens = 0

    def add(self, values: np.ndarray | Sequence[int]) -> None:
        arr = np.asarray(values)
        if arr.dtype != self.dtype:
            if arr.size and np.issubdtype(arr.dtype, np.integer):
                info = np.iinfo(self.dtype)
                if arr.min() < info.min or arr.max() > info.max:
                    raise DataError(f"{self.prefix}: record {self.count} has values outside "
                                    f"{np.dtype(self.dtype).name}")
            arr = arr.astype(self.dtype)
        arr = arr.reshape(-1)
        self._builder.add_document(arr, [arr.size])
        self.count += 1
        self.tokens += arr.size

    def add_many(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Append ``len(lengths)`` records at once, concatenated in ``flat`` (fast path for
        tokenizer workers: one write instead of one per record)."""
        flat = np.ascontiguousarray(flat, dtype=self.dtype)
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != flat.size or (lengths < 0).any():
            raise DataError(f"{self.prefix}: add_many lengths sum to {int(lengths.sum())}, data has {flat.size}")
        b = self._builder  # megatron-core 0.19.2 IndexedDatasetBuilder: data_file, sequence_lengths, document_indices
        b.data_file.write(flat.tobytes(order="C"))
        start = len(b.sequence_lengths)
        b.sequence_lengths.extend(lengths.tolist())
        b.document_indices.extend(range(start + 1, start + len(lengths) + 1))
        self.count += len(lengths)
        self.tokens += flat.size

    def add_index(self, prefix: str | Path) -> None:
        """Append a whole finished dataset (used to merge shards)."""
        ds = open_indexed(prefix)  # validate before copying
        # copy: megatron closes the index mmap when its reader is collected
        lengths = np.array(ds.sequence_lengths, dtype=np.int64)
        self._builder.add_index(str(prefix))
        self.count += len(lengths)
        self.tokens += int(lengths.sum())

    def close(self) -> None:
        self._builder.finalize(str(idx_path(self._tmp)))
        bin_path(self._tmp).replace(bin_path(self.prefix))
        idx_path(self._tmp).replace(idx_path(self.prefix))

    def abort(self) -> None:
        try:
            self._builder.data_file.close()
        except Exception:
            pass
        for p in (bin_path(self._tmp), idx_path(self._tmp)):
            p.unlink(missing_ok=True)

    def __enter__(self) -> "IndexedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


@dataclass
class EmbeddingMeta:
    """What an embedding store holds (its ``.json`` file)."""

    encoder: str
    num_patches: int
    embed_dim: int
    dtype: str
    image_size: int
    count: int = 0
    keys: Optional[list[str]] = None
    """Per record, the image it came from (path or id), for conversations to refer to."""
    resize: str = "square"
    """How images were made square before encoding: letterbox (padded) or square (stretched);
    stores written before this field existed are square."""
    source: Optional[dict] = None
    """Where the images came from and how captions were chosen (e.g. the WebDataset caption rule),
    when a reader recorded it."""

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **self.__dict__}


class EmbeddingWriter:
    """Writes an embedding store ``<prefix>.{bin,idx,json}``, one [P, D] 16-bit array per image."""

    def __init__(self, prefix: str | Path, *, encoder: str, num_patches: int, embed_dim: int,
                 dtype: str = "bfloat16", image_size: int = 0, resize: str = "square",
                 source: Optional[dict] = None):
        if dtype not in STORE_DTYPES:
            raise DataError(f"{prefix}: embedding dtype must be one of {sorted(STORE_DTYPES)}, got {dtype}")
        self.prefix = Path(prefix)
        self.meta = EmbeddingMeta(encoder, num_patches, embed_dim, dtype, image_size, 0, [], resize, source)
        self._w = IndexedWriter(prefix, np.uint8 if dtype == FP8 else np.uint16)

    def add(self, emb: torch.Tensor | np.ndarray, key: str = "") -> None:
        m = self.meta
        i = self._w.count
        if tuple(emb.shape) != (m.num_patches, m.embed_dim):
            raise DataError(f"{self.prefix}: record {i} ({key}) has shape {tuple(emb.shape)}, "
                            f"expected ({m.num_patches}, {m.embed_dim})")
        if isinstance(emb, np.ndarray):
            if emb.dtype != np.uint16:
                emb = torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32))
        if isinstance(emb, torch.Tensor):
            if not torch.isfinite(emb).all():
                raise DataError(f"{self.prefix}: record {i} ({key}) has NaN/Inf embeddings")
            if m.dtype == FP8:
                self._w.add(fp8_encode(emb))
                m.keys.append(key)  # type: ignore[union-attr]
                return
            bits = emb.detach().to("cpu", _DTYPES[m.dtype]).contiguous().view(torch.uint16).numpy()
        elif m.dtype == FP8:
            raise DataError(f"{self.prefix}: record {i} ({key}): an fp8 store takes float embeddings, "
                            f"not 16-bit patterns")
        else:
            bits = emb
            check_finite_bits(bits, m.dtype, f"{self.prefix}: record {i} ({key})")
        self._w.add(bits)
        m.keys.append(key)  # type: ignore[union-attr]

    def add_store(self, prefix: str | Path) -> None:
        """Append a finished store with identical metadata (shard merge)."""
        other = EmbeddingStore(prefix)
        for f in ("encoder", "num_patches", "embed_dim", "dtype", "image_size", "resize", "source"):
            if getattr(other.meta, f) != getattr(self.meta, f):
                raise DataError(f"{prefix}: {f}={getattr(other.meta, f)} differs from "
                                f"{getattr(self.meta, f)} of {self.prefix}")
        self._w.add_index(prefix)
        self.meta.keys.extend(other.meta.keys or [""] * len(other))  # type: ignore[union-attr]

    def __enter__(self) -> "EmbeddingWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._w.abort()
            return
        self.meta.count = self._w.count
        meta_path = Path(f"{self.prefix}.json")
        tmp = meta_path.with_name(f".{meta_path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.meta.to_json()))
        self._w.close()
        tmp.replace(meta_path)  # the .json appears last: a store without it is incomplete


def fp8_encode(emb: torch.Tensor) -> np.ndarray:
    """[P, D] float -> one fp8 record: P float32 scales (row amax / 448; 1 for an all-zero row)
    as bytes, then the P*D e4m3 values scaled into range."""
    x = emb.detach().to("cpu", torch.float32)
    amax = x.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (x / scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).contiguous().view(torch.uint8)
    return np.concatenate([scale.reshape(-1).numpy().view(np.uint8), q.reshape(-1).numpy()])


def fp8_decode(record: np.ndarray, num_patches: int, embed_dim: int) -> torch.Tensor:
    """One fp8 record -> [P, D] float32 (scale x e4m3 value)."""
    raw = np.ascontiguousarray(record, dtype=np.uint8)
    scale = torch.from_numpy(raw[:num_patches * 4].copy().view(np.float32)).view(num_patches, 1)
    q = _FP8_TO_F32[raw[num_patches * 4:]].reshape(num_patches, embed_dim)  # a table lookup: ~1.5x torch's cast
    return torch.from_numpy(q) * scale


_FP8_TO_F32 = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).to(torch.float32).numpy()
"""Every e4m3 byte's float32 value (0x7F and 0xFF are NaN)."""


def check_finite_bits(bits: np.ndarray, dtype: str, where: str) -> None:
    """Raise if any 16-bit pattern encodes NaN or Inf (all exponent bits set)."""
    m = _EXP_MASK[dtype]
    if np.any((bits & m) == m):
        raise DataError(f"{where}: NaN/Inf in embeddings")


# --------------------------------------------------------------------------------------------
# reading


def _read_index_header(path: Path) -> tuple[int, int, int]:
    try:
        with open(path, "rb") as f:
            head = f.read(34)
    except OSError as e:
        raise DataError(f"{path}: cannot read index ({e.strerror})") from None
    if len(head) < 34 or head[:9] != _IDX_HEADER:
        raise DataError(f"{path}: not a megatron .idx file (bad or truncated header)")
    version, code, seqs, docs = struct.unpack("<QBQQ", head[9:34])
    if version != 1:
        raise DataError(f"{path}: unsupported .idx version {version}")
    return code, seqs, docs


def open_indexed(prefix: str | Path):
    """Open a ``.bin``/``.idx`` pair as a megatron ``IndexedDataset`` after checking that the pair
    is complete and consistent (sizes, pointers) — megatron itself would read garbage."""
    prefix = Path(prefix)
    ip, bp = idx_path(prefix), bin_path(prefix)
    for p in (ip, bp):
        if not p.is_file():
            raise DataError(f"{p}: missing (expected the pair {bp.name} + {ip.name})")
    code, seqs, docs = _read_index_header(ip)
    mi = _megatron()
    try:
        itemsize = mi.DType.size(code)
    except Exception:
        raise DataError(f"{ip}: unknown dtype code {code}") from None
    need = 34 + seqs * 4 + seqs * 8 + docs * 8
    have = ip.stat().st_size
    if have < need:
        raise DataError(f"{ip}: truncated index ({have} bytes, header promises {need})")
    mm = np.memmap(ip, mode="r", dtype=np.uint8)
    lengths = np.frombuffer(mm, dtype=np.int32, count=seqs, offset=34)
    pointers = np.frombuffer(mm, dtype=np.int64, count=seqs, offset=34 + seqs * 4)
    if seqs:
        if (lengths < 0).any():
            bad = int(np.flatnonzero(lengths < 0)[0])
            raise DataError(f"{ip}: record {bad} has a negative length")
        expect = np.zeros(seqs, dtype=np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * itemsize, out=expect[1:])
        wrong = np.flatnonzero(pointers != expect)
        if wrong.size:
            raise DataError(f"{ip}: record {int(wrong[0])} points to byte {int(pointers[wrong[0]])}, "
                            f"expected {int(expect[wrong[0]])} (corrupt index)")
        total = int(expect[-1]) + int(lengths[-1]) * itemsize
    else:
        total = 0
    size = bp.stat().st_size
    if size != total:
        last = int(np.searchsorted(np.asarray(pointers) + np.asarray(lengths, np.int64) * itemsize,
                                   size, side="right")) if seqs else 0
        raise DataError(f"{bp}: {size} bytes but {ip.name} describes {total} bytes "
                        f"({seqs} records; data ends inside record {min(last, max(seqs - 1, 0))}) "
                        f"— truncated or mismatched pair")
    del mm
    import warnings

    try:
        with warnings.catch_warnings():  # megatron warns that it cannot tell the rank
            warnings.simplefilter("ignore")
            return mi.IndexedDataset(str(prefix), multimodal=False, mmap=True)
    except AssertionError as e:
        raise DataError(f"{prefix}: megatron rejects the pair: {e}") from None


class TokenData:
    """A validated token dataset: ``lengths`` per record and ``get(i, offset, length)``."""

    def __init__(self, prefix: str | Path):
        self.prefix = Path(prefix)
        self._ds = open_indexed(prefix)
        self.lengths = np.array(self._ds.sequence_lengths, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    def get(self, i: int, offset: int = 0, length: Optional[int] = None,
            dtype: Optional[type] = None) -> np.ndarray:
        """Tokens of record ``i`` (from ``offset``, ``length`` of them) as a fresh array: never a
        view, because megatron closes its memory map when the dataset is collected."""
        return np.array(self._ds.get(int(i), offset, length), dtype=dtype)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)


class EmbeddingStore:
    """A validated embedding store; ``get(i)`` returns the [P, D] uint16 bit pattern."""

    def __init__(self, prefix: str | Path, *, embed_dim: Optional[int] = None,
                 num_patches: Optional[int] = None, check_finite: bool = True,
                 encoder: Optional[str] = None):
        self.prefix = Path(prefix)
        meta_path = Path(f"{prefix}.json")
        if not meta_path.is_file():
            if not Path(f"{prefix}.bin").is_file() and not Path(f"{prefix}.idx").is_file():
                raise DataError(f"{prefix}: no embedding store there (no {Path(prefix).name}.json/.bin/.idx); "
                                f"make it with tools/encode_images.py")
            raise DataError(f"{meta_path}: missing metadata of embedding store {prefix} "
                            f"(an interrupted write, or not an embedding store)")
        try:
            raw = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{meta_path}: not valid JSON ({e})") from None
        if raw.pop("format", None) != FORMAT:
            raise DataError(f"{meta_path}: not a {FORMAT} store")
        try:
            self.meta = EmbeddingMeta(**raw)
        except TypeError as e:
            raise DataError(f"{meta_path}: bad metadata ({e})") from None
        if self.meta.dtype not in STORE_DTYPES:
            raise DataError(f"{meta_path}: dtype {self.meta.dtype!r} is not one of {', '.join(STORE_DTYPES)}")
        self.fp8 = self.meta.dtype == FP8
        if embed_dim is not None and self.meta.embed_dim != embed_dim:
            raise DataError(f"{meta_path}: embeddings are {self.meta.embed_dim} wide "
                            f"(encoder {self.meta.encoder}) but the config says "
                            f"model.vision.embed_dim={embed_dim}")
        if num_patches is not None and self.meta.num_patches != num_patches:
            raise DataError(f"{meta_path}: {self.meta.num_patches} patches per image "
                            f"(encoder {self.meta.encoder}, {self.meta.image_size} px) but the config "
                            f"says model.vision.num_patches={num_patches}")
        if encoder is not None and self.meta.encoder != encoder:
            raise DataError(f"{meta_path}: embeddings come from encoder {self.meta.encoder!r} but the "
                            f"config says model.vision.encoder={encoder!r}")
        self._ds = open_indexed(prefix)
        want = np.uint8 if self.fp8 else np.uint16
        if self._ds.index.dtype != want:
            raise DataError(f"{idx_path(prefix)}: embedding records of a {self.meta.dtype} store must be "
                            f"{np.dtype(want).name}")
        n = len(self._ds)
        if n != self.meta.count:
            raise DataError(f"{prefix}: {n} records but {meta_path.name} says {self.meta.count}")
        per = self.meta.num_patches * (self.meta.embed_dim + (4 if self.fp8 else 0))
        lengths = np.asarray(self._ds.sequence_lengths)
        bad = np.flatnonzero(lengths != per)
        if bad.size:
            raise DataError(f"{bin_path(prefix)}: record {int(bad[0])} holds {int(lengths[bad[0]])} "
                            f"values, expected {self.meta.num_patches}x{self.meta.embed_dim}={per}")
        self.check_finite = check_finite
        self.torch_dtype = torch.bfloat16 if self.fp8 else _DTYPES[self.meta.dtype]
        """The dtype records load as: an fp8 store upcasts to bfloat16."""
        self._mask = _EXP_MASK["bfloat16" if self.fp8 else self.meta.dtype]

    def __len__(self) -> int:
        return self.meta.count

    def get(self, i: int) -> np.ndarray:
        """Record ``i`` as a [P, D] uint16 array (a copy, checked for NaN/Inf); an fp8 store's record
        is upcast to bfloat16 bits."""
        if self.fp8:
            x = fp8_decode(np.asarray(self._ds.get(int(i))), self.meta.num_patches, self.meta.embed_dim)
            if self.check_finite and not torch.isfinite(x).all():
                raise DataError(f"{bin_path(self.prefix)}: record {int(i)} has NaN/Inf embeddings")
            return x.to(torch.bfloat16).view(torch.uint16).numpy()
        bits = np.array(self._ds.get(int(i))).reshape(self.meta.num_patches, self.meta.embed_dim)
        if self.check_finite and np.any((bits & self._mask) == self._mask):
            raise DataError(f"{bin_path(self.prefix)}: record {int(i)} has NaN/Inf embeddings")
        return bits

    def get_tensor(self, i: int) -> torch.Tensor:
        """Record ``i`` as a [P, D] tensor of the stored float dtype."""
        return torch.from_numpy(self.get(i)).view(self.torch_dtype)

    def verify(self) -> None:
        """Scan every record for NaN/Inf (tools call this; the loader checks records as it reads)."""
        for i in range(len(self)):
            self.get(i)
