#!/usr/bin/env python
"""Train a sentencepiece BPE tokenizer (special tokens as control symbols) on our corpora.

Inputs are plain-text files (one sentence/paragraph a line), JSONL files with a text field, or the
conversation (LLaVA .json/.jsonl) and caption JSONL files themselves: their turns / captions are read.

    python tools/train_tokenizer.py --input raw/text.jsonl --output tokenizer.model --vocab-size 8192
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megavlm.helpformat import HelpFormatter  # noqa: E402

from megavlm.data.indexed import DataError  # noqa: E402
from megavlm.prep.textprep import read_documents  # noqa: E402
from megavlm.data.tokenizer import TokenizerError, describe, train_sentencepiece  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--input", nargs="+", required=True, help="text or JSONL files")
    ap.add_argument("--output", required=True, help="model path (.model); a .vocab is written beside it")
    ap.add_argument("--vocab-size", type=int, default=8192, help="total ids including special tokens")
    ap.add_argument("--field", default="text", help="JSONL field holding the text (records without it: conversation turns or caption)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as td:
            plain = Path(td) / "train.txt"
            with open(plain, "w") as f:
                for p in a.input:
                    for _, text in read_documents(p, a.field):
                        f.write(text.replace("\n", " ") + "\n")
            tok = train_sentencepiece([plain], a.output, a.vocab_size, threads=a.threads)
    except (DataError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"trained {a.output} in {time.perf_counter() - t0:.1f}s: {describe(tok)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
