"""``megavlm bench prep``: the preparation of the paper's data, per CPU core.

Three measurements, each on real formats written with their own libraries:

* **text**: tokenizing ``.jsonl.zst`` shards (DCLM-baseline's format) into a token part
  (megavlm.prep.textparts) with a GPT-NeoX-style tokenizer: byte-level BPE from the ``tokenizers``
  library, 50k vocabulary. GPT-NeoX-20B's own ``tokenizer.json`` cannot be downloaded here, so a
  tokenizer of the same kind is trained on local text (the World English Bible of the demo's
  Debian package when it is cached, else synthetic text) and the documents are that text; the
  report says which. Pass ``--tokenizer`` to measure the real one where it exists.
* **images**: reading WebDataset tar shards (megavlm.prep.readers.webdataset) and decoding +
  resizing every JPEG with PIL to the encoder's input (384 px, SigLIP so400m's) — the CPU side
  of encoding. Images are 512 px JPEGs like img2dataset writes for DataComp.
* **loader**: reading an embedding store merged from many parts (megavlm.prep.parts) at the
  paper's shape (729 x 1152), bf16 and fp8 (upcast on load), plus the merge itself.

Rates per core divide by the process CPU time (one thread), so a loaded shared machine stretches
wall-clock figures much more than per-core ones. Writes ``benchmarks/<date>-cpu-prep.md``.

    megavlm bench prep [--quick] [--tokenizer tokenizer.json] [--out-dir benchmarks] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

from megavlm.bench.artifact import machine_info, write_report
from megavlm.run_folder import EMBEDS


def _clock():
    return time.perf_counter(), time.process_time()


def _since(t):
    w, c = _clock()
    return w - t[0], c - t[1]


def local_documents(n_chars: int) -> tuple[list[str], str]:
    """Real English text when the demo's Bible package is cached, else synthetic words."""
    try:
        from megavlm.demo.debian import bible_chapters, default_cache

        tree = default_cache() / "extract" / "sword-text-web"
        if (tree / ".complete").is_file():
            docs, total = [], 0
            for _, text in bible_chapters(tree):
                docs.append(text)
                total += len(text)
                if total >= n_chars:
                    break
            return docs, "World English Bible chapters (Debian sword-text-web)"
    except Exception:
        pass
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(letters[rng.integers(0, 26, int(rng.integers(2, 9)))]) for _ in range(20000)]
    docs = []
    while sum(map(len, docs)) < n_chars:
        docs.append(" ".join(words[j] for j in rng.integers(0, len(words), 600)))
    return docs, "synthetic words (the Bible package is not cached: run `megavlm prepare demo`)"


def neox_style_tokenizer(docs: list[str], path: Path, vocab: int) -> Path:
    """A byte-level BPE tokenizer.json like GPT-NeoX-20B's (same model type, pre-tokenizer and
    decoder; ``<|endoftext|>`` as its end-of-text), trained on ``docs``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer)
    tok.save(str(path))
    return path


def bench_text(work: Path, quick: bool, tokenizer: Optional[str]) -> dict:
    import zstandard

    from megavlm.data.indexed import TokenData
    from megavlm.data.tokenizer import load_tokenizer
    from megavlm.prep.textparts import tokenize_part

    docs, source = local_documents(400_000 if quick else 4_000_000)
    t = _clock()
    tok_path = Path(tokenizer) if tokenizer else neox_style_tokenizer(docs, work / "neox-style.json",
                                                                        2000 if quick else 50_000)
    train_s = _since(t)[0]
    tok = load_tokenizer(tok_path)
    shards = []
    c = zstandard.ZstdCompressor(level=3)
    per = max(1, len(docs) // 4)
    for k in range(4):
        part = docs[k * per:(k + 1) * per] if k < 3 else docs[3 * per:]
        p = work / f"dclm-{k:05d}.jsonl.zst"
        p.write_bytes(c.compress("".join(json.dumps({"text": d, "url": "local"}) + "\n" for d in part).encode()))
        shards.append(p)
    t = _clock()
    tokens = 0
    for k, s in enumerate(shards):
        tokenize_part(s, work / f"text-p{k}", None, tokenizer=tok)
        tokens += int(TokenData(work / f"text-p{k}").lengths.sum())
    wall, cpu = _since(t)
    chars = sum(map(len, docs))
    return {"source": source, "tokenizer": str(tokenizer) if tokenizer else
            f"byte-level BPE trained here ({tok.vocab_size:,} ids incl. specials, {train_s:.1f} s to train)",
            "documents": len(docs), "chars": chars, "tokens": tokens, "wall": wall, "cpu": cpu,
            "zst_bytes": sum(s.stat().st_size for s in shards)}


def bench_images(work: Path, quick: bool) -> dict:
    import io

    import webdataset as wds
    from PIL import Image

    from megavlm.encoders import decode_pil
    from megavlm.prep.readers.webdataset import read_tar_shard

    n, side, size = (24, 256, 64) if quick else (160, 512, 384)
    rng = np.random.default_rng(0)
    shards = []
    for s in range(4):
        p = work / f"datacomp-{s:05d}.tar"
        with wds.TarWriter(str(p)) as w:
            for i in range(n // 4):
                yy, xx = np.mgrid[:side, :side]
                arr = np.stack([(xx * (i + 2)) % 256, (yy * 3 + 17 * i) % 256, (xx + yy) % 256], -1)
                arr = np.clip(arr + rng.normal(0, 25, arr.shape), 0, 255).astype(np.uint8)  # photo-like noise
                b = io.BytesIO()
                Image.fromarray(arr).save(b, format="JPEG", quality=90)
                w.write({"__key__": f"{s:04d}{i:05d}", "jpg": b.getvalue(), "txt": f"an image {i}",
                         "json": json.dumps({"caption": f"an image {i}"})})
        shards.append(p)
    t = _clock()
    count = 0
    for p in shards:
        for smp in read_tar_shard(p):
            decode_pil(smp.image, size, smp.where, "letterbox", (127, 127, 127))
            count += 1
    wall, cpu = _since(t)
    return {"images": count, "side": side, "size": size, "wall": wall, "cpu": cpu,
            "tar_bytes": sum(p.stat().st_size for p in shards)}


def bench_loader(work: Path, quick: bool) -> list[dict]:
    import torch

    from megavlm.data.indexed import FP8, EmbeddingStore, EmbeddingWriter
    from megavlm.prep import parts as P

    P_, D, parts, per = (16, 64, 8, 4) if quick else (729, 1152, 16, 8)
    out = []
    g = torch.Generator().manual_seed(0)
    embs = [torch.randn(P_, D, generator=g) for _ in range(per)]
    for dtype in ("bfloat16", FP8):
        root = work / f"store-{dtype}"
        P.write_job(root, {"kind": "images", "outputs": ["embeds"], "inputs": [f"s{k}" for k in range(parts)]})
        for k in range(parts):
            prefix = P.part_prefix(root, k)
            with EmbeddingWriter(f"{prefix}.embeds", encoder="bench", num_patches=P_, embed_dim=D, dtype=dtype) as w:
                for j, e in enumerate(embs):
                    w.add(e, f"{k}-{j}")
            (Path(f"{prefix}.rejects.jsonl")).write_text("")
            Path(f"{prefix}.done.json").write_text(json.dumps({"shard": f"s{k}", "records": per, "rejected": 0}))
        t = _clock()
        P.merge_parts(root)
        merge_wall, _ = _since(t)
        store = EmbeddingStore(f"{root}.embeds")
        order = np.random.default_rng(0).permutation(len(store))
        t = _clock()
        for i in order:
            store.get(int(i))
        wall, cpu = _since(t)
        nbytes = Path(f"{root}{EMBEDS[0]}").stat().st_size
        out.append({"dtype": dtype, "parts": parts, "images": len(store), "shape": f"{P_} x {D}",
                    "bytes": nbytes, "merge_s": merge_wall, "wall": wall, "cpu": cpu})
    return out


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog="megavlm bench prep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes: seconds (the test uses it)")
    ap.add_argument("--tokenizer", default=None, help="a tokenizer.json to measure (e.g. GPT-NeoX-20B's)")
    ap.add_argument("--only", nargs="*", choices=["text", "images", "loader"], default=["text", "images", "loader"])
    ap.add_argument("--out-dir", default="benchmarks")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    import os

    import torch

    torch.set_num_threads(1)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from megavlm.data.indexed import _megatron

    _megatron()  # the one-time import (seconds) is not part of any measured rate
    info = machine_info(("megatron-core", "tokenizers", "webdataset", "zstandard", "pillow"))
    command = "megavlm bench prep " + " ".join(shlex.quote(x) for x in argv)
    md = [f"# Data preparation on CPU ({'quick sizes' if a.quick else 'bench sizes'})", "",
          f"Command: `{command}`", ""] + [f"- {k}: {v}" for k, v in info.items()] + [""]
    with tempfile.TemporaryDirectory(prefix="megavlm-bench-prep-") as tmp:
        work = Path(tmp)
        if "text" in a.only:
            r = bench_text(work, a.quick, a.tokenizer)
            md += ["## Text: .jsonl.zst shards -> token parts (one process)", "",
                   f"Tokenizer: {r['tokenizer']}. GPT-NeoX-20B's own tokenizer.json is not downloadable "
                   "on this machine; this one has the same model type (byte-level BPE, trained toward a 50k "
                   "vocabulary; the local text supports the number of ids shown), so its speed is indicative, "
                   "not GPT-NeoX's own.", "",
                   f"Documents: {r['documents']:,} ({r['chars']:,} characters) of {r['source']}, "
                   f"in 4 zstd shards of {r['zst_bytes']:,} bytes together.", "",
                   "| tokens | wall s | CPU s | tokens/s (wall) | tokens/s per core |", "|---|---|---|---|---|",
                   f"| {r['tokens']:,} | {r['wall']:.2f} | {r['cpu']:.2f} | {r['tokens'] / r['wall']:,.0f} | "
                   f"{r['tokens'] / r['cpu']:,.0f} |", ""]
            print(f"text: {r['tokens'] / r['cpu']:,.0f} tokens/s per core", flush=True)
        if "images" in a.only:
            r = bench_images(work, a.quick)
            md += ["## Images: WebDataset tar read + JPEG decode + letterbox resize (PIL, one process)", "",
                   f"{r['images']} JPEGs of {r['side']} px in 4 shards ({r['tar_bytes']:,} bytes), "
                   f"decoded and resized to {r['size']} px.", "",
                   "| images | wall s | CPU s | images/s (wall) | images/s per core |", "|---|---|---|---|---|",
                   f"| {r['images']} | {r['wall']:.2f} | {r['cpu']:.2f} | {r['images'] / r['wall']:.1f} | "
                   f"{r['images'] / r['cpu']:.1f} |", ""]
            print(f"images: {r['images'] / r['cpu']:.1f} images/s per core", flush=True)
        if "loader" in a.only:
            rows = bench_loader(work, a.quick)
            md += ["## Loader: an embedding store merged from many parts, random-order reads", "",
                   "| dtype | parts | images | shape | store bytes | merge s | images/s per core | MB/s per core (as stored) |",
                   "|---|---|---|---|---|---|---|---|"]
            for r in rows:
                md.append(f"| {r['dtype']} | {r['parts']} | {r['images']} | {r['shape']} | {r['bytes']:,} | "
                          f"{r['merge_s']:.2f} | {r['images'] / r['cpu']:.0f} | {r['bytes'] / r['cpu'] / 1e6:,.0f} |")
                print(f"loader {r['dtype']}: {r['images'] / r['cpu']:.0f} images/s per core", flush=True)
            md += ["", "fp8 reads upcast to bf16 on the CPU (scale x e4m3): half the bytes, more CPU per image.", ""]
    text = "\n".join(md) + "\n"
    if a.no_write:
        print(text)
    else:
        suffix = "prep-quick" if a.quick else "prep"
        print(f"wrote {write_report(a.out_dir, 'cpu', suffix, text)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
