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


def read_documents(path: str | Path, field: str = "text", reject=None) -> Iterator[tuple[str, str]]:
    """Yield (where, text) for each non-empty document of a JSONL (also ``.jsonl.zst``/``.jsonl.gz``),
    parquet or plain-text file, or of a LLaVA ``.json`` list; conversation and caption records give
    their turns / caption (megavlm.prep.readers.text)."""
    from megavlm.prep.readers.text import read_documents as _read

    return _read(path, field, reject)


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
                    progress: bool = True, reject=None) -> TextStats:
    """Tokenize every document of ``inputs`` into ``<out_prefix>.{bin,idx}`` (EOD appended).
    ``reject(message)``, when given, receives bad lines instead of an error (the skip policy)."""
    from tqdm import tqdm
    from megavlm.progress import bars_enabled

    from megavlm.data.indexed import _megatron

    _megatron()  # the one-time import (seconds) is not part of the measured rate
    tok = load_tokenizer(tokenizer)
    stats = TextStats(workers=workers)
    t0 = time.perf_counter()

    def docs() -> Iterator[tuple[str, str]]:
        for p in inputs:
            yield from read_documents(p, field, reject)

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
