"""Raw text -> megatron token datasets, in parallel worker processes.

Input is JSONL (one object per line, documents under a field, ``text`` by default) or plain text
(documents separated by blank lines). Each document becomes one record of token ids with EOD
appended, so the ``.bin/.idx`` pair loads directly in megatron-core as well as in our loader.
Workers only tokenize and send back numpy arrays (cheap to pickle); the parent writes whole chunks
under a temporary name and renames at the end, so an error or interruption leaves no
half-written output.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from megavlm.data.indexed import DataError, IndexedWriter, token_dtype
from megavlm.data.tokenizer import Tokenizer, load_tokenizer


def record_text(rec: object, field: str = "text") -> Optional[str]:
    """The text of one JSON record: its ``field``; else, for the files the walk-through feeds the
    tokenizer, a LLaVA conversation's turns (``<image>`` removed, as training sees them) or a
    caption record's ``caption``. None when the record has none of these."""
    if not isinstance(rec, dict):
        return None
    if isinstance(rec.get(field), str):
        return rec[field]
    turns = rec.get("conversations")
    if isinstance(turns, list):
        from megavlm.data.prompt import user_text

        return "\n".join(user_text(t["value"]) for t in turns if isinstance(t, dict) and isinstance(t.get("value"), str))
    if isinstance(rec.get("caption"), str):
        return rec["caption"]
    return None


def read_documents(path: str | Path, field: str = "text") -> Iterator[tuple[str, str]]:
    """Yield (where, text) for each non-empty document of a JSONL or plain-text file, or of a
    LLaVA ``.json`` list of conversations. JSON records give their ``field``, or (conversation and
    caption files, so the tokenizer and a text set can be made from them) their turns / caption."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix == ".json" and path.read_bytes()[:4096].lstrip().startswith(b"["):  # a LLaVA list
        from megavlm.prep.conversations import load_llava

        for k, rec in enumerate(load_llava(path), 1):
            text = record_text(rec, field)
            if text is None:
                raise DataError(f"{path}: record {k}: expected an object with a string field {field!r} "
                                f"or a 'conversations' list")
            if text.strip():
                yield f"{path}: record {k}", text
        return
    jsonl = path.suffix in (".jsonl", ".json")
    with open(path, "rb") as f:
        para: list[str] = []
        start = 1
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{n}: invalid UTF-8 ({e.reason} at byte {e.start})") from None
            if jsonl:
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                text = record_text(rec, field)
                if text is None:
                    raise DataError(f"{path}:{n}: expected an object with a string field {field!r} "
                                    f"(or a 'conversations' list, or a 'caption')")
                if text.strip():
                    yield f"{path}:{n}", text
            elif line.strip():
                if not para:
                    start = n
                para.append(line)
            elif para:
                yield f"{path}:{start}", "".join(para).strip("\n")
                para = []
        if para:
            yield f"{path}:{start}", "".join(para).strip("\n")


_worker_tok: Optional[Tokenizer] = None


def _init_worker(tok_path: str) -> None:
    global _worker_tok  # per-process cache of the tokenizer in pool workers
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: workers are the parallelism
    _worker_tok = load_tokenizer(tok_path)


def _encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    assert _worker_tok is not None
    return encode_documents(_worker_tok, texts)


def encode_documents(tok: Tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(flat ids with EOD after each document, per-document lengths) — numpy arrays, which are
    cheap to send between processes and to write in one go."""
    ids = tok.encode_batch(texts)
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    flat = np.full(int(lengths.sum()), tok.eod, dtype=token_dtype(tok.vocab_size))
    ends = np.cumsum(lengths) - 1  # EOD positions
    mask = np.ones(flat.size, dtype=bool)
    mask[ends] = False
    flat[mask] = np.fromiter(chain.from_iterable(ids), dtype=np.int64, count=int(mask.sum()))
    return flat, lengths


def _chunks(docs: Iterator[tuple[str, str]], size: int) -> Iterator[list[str]]:
    buf: list[str] = []
    for _, text in docs:
        buf.append(text)
        if len(buf) == size:
            yield buf
            buf = []
    if buf:
        yield buf


@dataclass
class TextStats:
    documents: int = 0
    tokens: int = 0
    seconds: float = 0.0
    workers: int = 1

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def preprocess_text(inputs: Sequence[str | Path], out_prefix: str | Path, tokenizer: str | Path, *,
                    workers: int = 1, field: str = "text", chunk_docs: int = 256,
                    progress: bool = True) -> TextStats:
    """Tokenize every document of ``inputs`` into ``<out_prefix>.{bin,idx}`` (EOD appended)."""
    from tqdm import tqdm
    from megavlm.progress import bars_enabled

    from megavlm.data.indexed import _megatron

    _megatron()  # the one-time import (seconds) is not part of the measured rate
    tok = load_tokenizer(tokenizer)
    stats = TextStats(workers=workers)
    t0 = time.perf_counter()

    def docs() -> Iterator[tuple[str, str]]:
        for p in inputs:
            yield from read_documents(p, field)

    bar = tqdm(unit="tok", unit_scale=True, disable=not (progress and bars_enabled()), desc=f"tokenize {Path(out_prefix).name}")
    with IndexedWriter(out_prefix, token_dtype(tok.vocab_size)) as w:
        if workers <= 1:
            results: Iterator[tuple[np.ndarray, np.ndarray]] = (
                encode_documents(tok, c) for c in _chunks(docs(), chunk_docs))
            pool = None
        else:
            pool = mp.get_context("fork").Pool(workers, initializer=_init_worker, initargs=(str(tokenizer),))
            results = pool.imap(_encode_chunk, _chunks(docs(), chunk_docs), chunksize=1)
        try:
            for flat, lengths in results:
                w.add_many(flat, lengths)
                stats.tokens += flat.size
                stats.documents += len(lengths)
                bar.update(flat.size)
        finally:
            if pool is not None:
                pool.terminate()
    bar.close()
    if stats.documents == 0:
        for suffix in (".bin", ".idx"):
            Path(f"{out_prefix}{suffix}").unlink(missing_ok=True)
        raise DataError(f"{', '.join(map(str, inputs))}: no documents")
    stats.seconds = time.perf_counter() - t0
    return stats
