#!/usr/bin/env python
"""LLaVA-format conversations -> tokens + per-token loss mask + image references.

    python tools/preprocess_conversations.py --input llava.json --tokenizer tokenizer.model \
        --embeds data/images.embeds --output data/instructions

Only model answers are trained (system prompt and human turns masked); a SEP closes every human
turn and every model answer. Images are referenced by the keys of an embedding store made by
tools/encode_images.py (the records' "image" fields must match its input paths).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megavlm.helpformat import HelpFormatter  # noqa: E402

from megavlm.prep.conversations import preprocess_conversations  # noqa: E402
from megavlm.data.indexed import DataError  # noqa: E402
from megavlm.data.tokenizer import TokenizerError, load_tokenizer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--input", nargs="+", required=True, help="LLaVA .json (list) or .jsonl files")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--output", required=True, help="output prefix")
    ap.add_argument("--embeds", default=None, help="the images' embedding store: the --output of "
                    "tools/encode_images.py (data/captions) or the store itself (data/captions.embeds)")
    a = ap.parse_args(argv)
    try:
        st = preprocess_conversations(a.input, a.output, load_tokenizer(a.tokenizer), embeds=a.embeds)
    except (DataError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{a.output}: {st.conversations} conversations ({st.with_image} with an image), "
          f"{st.tokens} tokens, {st.trained_tokens} trained")
    return 0


if __name__ == "__main__":
    sys.exit(main())
