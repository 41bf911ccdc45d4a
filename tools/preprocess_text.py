#!/usr/bin/env python
"""Tokenize plain text / JSONL documents into a megatron-core .bin/.idx pair (EOD after each document).

    python tools/preprocess_text.py --input docs.jsonl --tokenizer tokenizer.model --output data/text --workers 2

Plain-text inputs hold documents separated by blank lines; JSONL inputs one object per line with
the text under --field. uint16 ids when the vocabulary fits. Prints tokens/s at the end.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megavlm.helpformat import HelpFormatter  # noqa: E402

from megavlm.data.indexed import DataError  # noqa: E402
from megavlm.prep.textprep import preprocess_text  # noqa: E402
from megavlm.data.tokenizer import TokenizerError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--input", nargs="+", required=True)
    ap.add_argument("--tokenizer", required=True, help="sentencepiece .model or tokenizer.json")
    ap.add_argument("--output", required=True, help="output prefix (writes PREFIX.bin and PREFIX.idx)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--field", default="text")
    ap.add_argument("--chunk-docs", type=int, default=256, help="documents per worker task")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    try:
        st = preprocess_text(a.input, a.output, a.tokenizer, workers=a.workers, field=a.field,
                             chunk_docs=a.chunk_docs, progress=not a.no_progress)
    except (DataError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{a.output}: {st.documents} documents, {st.tokens} tokens in {st.seconds:.2f}s = "
          f"{st.tokens_per_s:,.0f} tokens/s with {st.workers} worker(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
