"""``megavlm bench data``: how fast the run-time data path feeds a step, per CPU core.

Why: one H100 trains the paper's 1.4B model at about 45k tokens/s; the loader (mixture planning,
reading token datasets and embedding stores, packing, collating) runs in the training process,
so the target is ten times that, 450k tokens/s, on one core. This measures ``StageLoader`` at the
paper's sizes — sequences of 1024 and 2048, SigLIP-shaped images (729 patches x 1152), stage
mixtures of text only, 10 % and 50 % caption positions — on a synthetic corpus with the 1.4B
recipe's shapes (uint16 ids below 50k, web-like document lengths), built once in ``--work``.
Tokens/s per core divides by the CPU time of this process (torch on one thread), so a shared,
loaded machine stretches the wall-clock figure but much less the per-core one.

``--quick`` runs small sizes in seconds (the test uses it; its report is ``…-cpu-data-quick.md``); ``--only text images`` adds the
preparation benchmarks of megavlm.prep (preprocess_text and encode_images on the demo corpus,
``megavlm prepare demo`` first). The dated report is written by megavlm.bench.artifact.

    megavlm bench data [--quick] [--steps 10] [--work DIR] [--out-dir benchmarks] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from megavlm.bench.artifact import load_average, machine_info, write_report


@dataclass(frozen=True)
class Sizes:
    """The shapes of one benchmark setting."""

    seqs: tuple[int, ...]
    patches: int
    width: int
    documents: int
    images: int
    micro_batch: int
    num_microbatches: int
    steps: int


PAPER = Sizes(seqs=(1024, 2048), patches=729, width=1152, documents=60_000, images=96,
              micro_batch=8, num_microbatches=4, steps=10)
QUICK = Sizes(seqs=(128, 256), patches=16, width=64, documents=600, images=24,
              micro_batch=2, num_microbatches=2, steps=3)
MIXTURES = (("text 1.0", 1.0, 0.0), ("text 0.9 / captions 0.1", 0.9, 0.1),
            ("text 0.5 / captions 0.5", 0.5, 0.5))
VOCAB = 50_000
"""Token ids of the synthetic corpus stay below this (the 1.4B recipe's vocabulary is 50432)."""


def _tokenizer(root: Path) -> None:
    """A real (tiny) sentencepiece model: the loader needs only its special ids."""
    from megavlm.data.tokenizer import train_sentencepiece

    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(letters[rng.integers(0, 26, int(rng.integers(2, 8)))]) for _ in range(3000)]
    txt = root / "tokenizer_train.txt"
    txt.write_text("\n".join(" ".join(words[j] for j in rng.integers(0, 3000, 12)) for _ in range(3000)) + "\n")
    train_sentencepiece([txt], root / "tokenizer.model", vocab_size=400, threads=1)


def synthetic_corpus(work: Path, sz: Sizes) -> Path:
    """Text and a caption set (with its embedding store) in ``work``, built once per size."""
    import shutil

    import torch

    from megavlm.data.indexed import EmbeddingWriter, IndexedWriter

    root = work / f"loader-corpus-p{sz.patches}x{sz.width}-d{sz.documents}-i{sz.images}"
    if (root / "done").is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(6.0, 1.0, sz.documents).astype(np.int64), 20, 20_000)  # median ~400
    with IndexedWriter(root / "text", np.uint16) as w:
        w.add_many(rng.integers(8, VOCAB, int(lengths.sum()), dtype=np.uint16), lengths)
    g = torch.Generator().manual_seed(0)
    with EmbeddingWriter(root / "captions.embeds", encoder="synthetic-siglip-shape", num_patches=sz.patches,
                         embed_dim=sz.width) as ew, IndexedWriter(root / "captions", np.uint16) as cw:
        for i in range(sz.images):
            ew.add(torch.randn(sz.patches, sz.width, generator=g), key=str(i))
            cw.add(rng.integers(8, VOCAB, int(rng.integers(8, 60)), dtype=np.uint16))
    _tokenizer(root)
    (root / "done").touch()
    return root


@dataclass
class LoaderResult:
    mixture: str
    seq: int
    rows: str
    steps: int
    positions: int
    image_positions: int
    wall_s: float
    cpu_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.positions / self.wall_s

    @property
    def tokens_per_core_s(self) -> float:
        return self.positions / max(self.cpu_s, 1e-9)


def bench_loader(work: Path, sz: Sizes) -> list[LoaderResult]:
    """Every (sequence, mixture) case: one warm-up step, then ``sz.steps`` timed steps."""
    import torch

    from megavlm.config import DataConfig, MixtureConfig, VisionConfig
    from megavlm.data.mixture import LoaderSpec
    from megavlm.train.plan import build_loader

    torch.set_num_threads(1)
    root = synthetic_corpus(work, sz)
    data = DataConfig(root=str(root))
    vision = VisionConfig(embed_dim=sz.width, num_patches=sz.patches)
    out = []
    for seq in sz.seqs:
        for name, text, caps in MIXTURES:
            spec = LoaderSpec(stage="bench", data=data, mixture=MixtureConfig(text=text, captions=caps),
                              vision=vision, seq_length=seq, seed=0)
            ld = build_loader(spec, micro_batch_size=sz.micro_batch, num_microbatches=sz.num_microbatches)
            ld.next_step()
            img = 0
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(sz.steps):
                for b in ld.next_step():
                    img += 0 if b.image_slots is None else b.image_slots.shape[0] * sz.patches
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            rows = sz.micro_batch * sz.num_microbatches
            out.append(LoaderResult(name, seq, f"{sz.micro_batch} x {sz.num_microbatches}", sz.steps,
                                    sz.steps * rows * seq, img, wall, cpu))
    return out


def loader_table(results: list[LoaderResult]) -> list[str]:
    lines = ["| mixture | seq | micro batch x microbatches | steps | positions | image positions | "
             "wall s | CPU s | tokens/s | tokens/s per core | per core vs 450k target |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.mixture} | {r.seq} | {r.rows} | {r.steps} | {r.positions} | "
                     f"{r.image_positions / r.positions:.1%} | {r.wall_s:.3f} | {r.cpu_s:.3f} | "
                     f"{r.tokens_per_s:,.0f} | {r.tokens_per_core_s:,.0f} | {r.tokens_per_core_s / 450_000:.1f}x |")
    return lines


# ---------------------------------------------------------------- preparation (demo corpus)

def bench_text(root: Path, work: Path) -> list[str]:
    """preprocess_text tokens/s with 1 and 2 workers on the demo text corpus (x3)."""
    from megavlm.prep.textprep import preprocess_text

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # HF tokenizers: one thread per worker
    src = work / "bench_text.jsonl"
    lines = (root / "raw/text.jsonl").read_text().splitlines()
    src.write_text("\n".join(lines * 3) + "\n")
    out = ["| tokenizer | workers | documents | tokens | seconds | tokens/s | scaling |",
           "|---|---|---|---|---|---|---|"]
    tok = root / "tokenizer.model"
    preprocess_text([src], work / "text_warm", tok, workers=1, progress=False)  # warm the file cache
    base = None
    for w in (1, 2):
        st = preprocess_text([src], work / f"text_w{w}", tok, workers=w, progress=False)
        base = base or st.tokens_per_s
        out.append(f"| sentencepiece BPE 8k (demo) | {w} | {st.documents} | {st.tokens} | {st.seconds:.2f} | "
                   f"{st.tokens_per_s:,.0f} | {st.tokens_per_s / base:.2f}x |")
    return out


def bench_images(root: Path, work: Path, n: int) -> list[str]:
    """encode_images images/s (EfficientNet-Lite0) with the PIL (and DALI, if present) decoder."""
    from megavlm.data.tokenizer import load_tokenizer
    from megavlm.encoders import EfficientNetLite0, dali_available, encode_images, read_image_list

    recs = [r for r in read_image_list(root / "raw/captions.jsonl") if "tuxpaint" in str(r.path)][:n]
    tok = load_tokenizer(root / "tokenizer.model")
    out = ["| decoder | image size | images | seconds | images/s |", "|---|---|---|---|---|"]
    decoders = ["pil"] + (["dali"] if dali_available() else [])
    for size in (128, 224):
        enc = EfficientNetLite0(size)
        enc(np.zeros((32, size, size, 3), np.uint8))  # warm-up
        for dec in decoders:
            st = encode_images(recs, work / f"img_{size}_{dec}", enc, tokenizer=tok, decoder=dec,
                               batch_size=32, progress=False, resize="square")
            out.append(f"| {dec} | {size} | {st.images} | {st.seconds:.2f} | {st.images_per_s:.1f} |")
    return out


# --------------------------------------------------------------------------------- command

def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog="megavlm bench data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (seq 128/256, 16 x 64 images): seconds")
    ap.add_argument("--steps", type=int, default=None, help="timed loader steps per case")
    ap.add_argument("--only", nargs="*", choices=["loader", "text", "images"], default=["loader"])
    ap.add_argument("--demo-root", default="~/.cache/megavlm/demo", help="for --only text/images")
    ap.add_argument("--images", type=int, default=200, help="images for --only images")
    ap.add_argument("--work", default=None, help="where the synthetic corpus is kept (default: a temp dir)")
    ap.add_argument("--out-dir", default="benchmarks")
    ap.add_argument("--no-write", action="store_true", help="print the report, write no file")
    a = ap.parse_args(argv)
    sz = QUICK if a.quick else PAPER
    if a.steps is not None:
        if a.steps < 1:
            ap.error("--steps must be at least 1")
        sz = Sizes(**{**sz.__dict__, "steps": a.steps})
    import torch

    torch.set_num_threads(1)  # the loader's figures are per core
    info = machine_info()  # before the runs: the load average is the machine's, not ours
    tmp = None if a.work else tempfile.TemporaryDirectory(prefix="megavlm-bench-data-")
    work = Path(a.work or tmp.name).expanduser()  # type: ignore[union-attr]
    work.mkdir(parents=True, exist_ok=True)
    command = "megavlm bench data " + " ".join(shlex.quote(x) for x in argv)
    md = [f"# Data path on CPU ({'quick sizes' if a.quick else 'paper sizes'})", "",
          f"Command: `{command}`", ""] + [f"- {k}: {v}" for k, v in info.items()] + [""]
    try:
        if "loader" in a.only:
            res = bench_loader(work, sz)
            md += ["## Loader (StageLoader: mix + read + pack + collate, one core)", "",
                   f"Synthetic corpus: {sz.documents} documents (log-normal lengths, median ~400 tokens), "
                   f"{sz.images} images of {sz.patches} x {sz.width} (bf16) with 8-60 token captions. "
                   "Tokens/s per core = positions / CPU time of this process (torch 1 thread); "
                   "target: 450k tokens/s per core, 10x what one H100 consumes at the paper's 1.4B size (~45k).", ""]
            md += loader_table(res)
            for r in res:
                print(f"{r.mixture:28s} seq {r.seq:5d}: {r.tokens_per_s:12,.0f} tokens/s, "
                      f"{r.tokens_per_core_s:12,.0f} tokens/s per core", flush=True)
        root = Path(a.demo_root).expanduser()
        if "text" in a.only:
            md += ["", "## preprocess_text (demo corpus x3)", ""] + bench_text(root, work)
        if "images" in a.only:
            md += ["", f"## encode_images ({a.images} Tux Paint stamps)", ""] + bench_images(root, work, a.images)
    finally:
        if tmp is not None:
            tmp.cleanup()
    md += ["", f"Load average at the end (1/5/15 min): {load_average()}", ""]
    text = "\n".join(md)
    if a.no_write:
        print(text)
        return 0
    name = "data-quick" if a.quick else "data"  # a quick run never replaces a paper-size result
    print(f"wrote {write_report(a.out_dir, 'cpu', name, text)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
