"""One text shard (``.jsonl``, ``.jsonl.zst``, ``.jsonl.gz``, parquet, plain) -> one token part.

The worker of parallel tokenization (megavlm.prep.parts): one process per worker (the workers are
the parallelism, ``TOKENIZERS_PARALLELISM`` off), documents tokenized in chunks and written with
EOD after each, under a temporary name renamed at the end, so a part is either whole or absent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from megavlm.data.indexed import IndexedWriter, token_dtype
from megavlm.prep.readers.text import read_documents
from megavlm.prep.textprep import encode_documents


def tokenize_part(shard: Path, prefix: Path, reject: Optional[Callable[[str], None]], *, tokenizer,
                  field: str = "text", chunk_docs: int = 256) -> int:
    def chunks() -> Iterator[list[str]]:
        buf: list[str] = []
        for _, text in read_documents(shard, field, reject):
            buf.append(text)
            if len(buf) == chunk_docs:
                yield buf
                buf = []
        if buf:
            yield buf

    with IndexedWriter(prefix, token_dtype(tokenizer.vocab_size)) as w:
        for c in chunks():
            flat, lengths = encode_documents(tokenizer, c)
            w.add_many(flat, lengths)
        return w.count
