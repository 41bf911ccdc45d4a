#!/usr/bin/env python
"""LLaVA-format conversations -> tokens + per-token loss mask + image references.

    python tools/preprocess_conversations.py --input llava.json --tokenizer tokenizer.model \
        --embeds data/images.embeds --output data/instructions

Only model answers are trained (system prompt and human turns masked); a SEP closes every human
turn and every model answer. Images are referenced by the keys of an embedding store made by
tools/encode_images.py (the records' "image" fields must match its input paths).

LLaVA-665k: give --image-root (the folder holding coco/, gqa/, ocr_vqa/, textvqa/, vg/); every
record's image is checked there first and a missing one is named (file, record, id) before any
work, or with --bad-input skip dropped and listed in OUTPUT.rejects.jsonl. Text-only records (no
"image") and multi-turn records are kept as they are. Encode the images with
`tools/encode_images.py --input llava.json --image-root ROOT --no-captions --output data/llava-images`.
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
    ap.add_argument("--image-root", default=None, help="check every record's image under this folder first")
    ap.add_argument("--bad-input", choices=["raise", "skip"], default="raise",
                    help="a record whose image is missing under --image-root: stop, or drop and list it")
    a = ap.parse_args(argv)
    try:
        inputs, rejects = list(a.input), []
        if a.image_root:
            import json
            import tempfile

            from megavlm.prep.readers.llava import check_images

            work = Path(tempfile.mkdtemp(prefix=f".{Path(a.output).name}.", dir=Path(a.output).parent
                                         if Path(a.output).parent.is_dir() else None))
            try:
                inputs, rejects = check_images(a.input, a.image_root, skip=a.bad_input == "skip", workdir=work)
                st = preprocess_conversations(inputs, a.output, load_tokenizer(a.tokenizer), embeds=a.embeds)
            finally:
                import shutil

                shutil.rmtree(work, ignore_errors=True)  # the filtered copies (skip policy)
        else:
            st = preprocess_conversations(inputs, a.output, load_tokenizer(a.tokenizer), embeds=a.embeds)
        if a.image_root:
            tmp = Path(f"{a.output}.rejects.jsonl.tmp")
            tmp.write_text("".join(json.dumps({"problem": r}) + "\n" for r in rejects))
            tmp.replace(f"{a.output}.rejects.jsonl")
    except (DataError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{a.output}: {st.conversations} conversations ({st.with_image} with an image), "
          f"{st.tokens} tokens, {st.trained_tokens} trained"
          + (f", {len(rejects)} rejected (listed in {a.output}.rejects.jsonl)" if rejects else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
