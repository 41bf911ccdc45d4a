"""``megavlm prepare --plan``: what a recipe's data will take on disk, before any work starts.

The paper's image-text stage (28B tokens, 10 % captions, 729 x 1152 patches) needs ~3.7M images,
~6.3 TB of bf16 embeddings; nothing else tells a user that before the encode has filled the disk.
From the recipe alone (stage budgets, mixture fractions, ``model.vision``, vocabulary) this
estimates, per kind of set: tokens, images, conversations and bytes, and compares the total with
the free space under ``data.root``. Assumptions are printed with the numbers (mean caption and
conversation lengths, the fraction of conversations with an image; LLaVA-665k's by default).
With ``--inputs KIND=GLOB`` it also lists the input shards found and their size.

A set is sized for one pass of the stages that draw from it (the mixture samples without
replacement within an epoch, megavlm.data.mixture); a smaller set is repeated, which the paper
does not do.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence


@dataclass
class SetPlan:
    kind: str
    names: list[str]
    tokens: int = 0
    images: int = 0
    conversations: int = 0
    bytes: int = 0
    notes: list[str] = field(default_factory=list)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


def embed_bytes(images: int, num_patches: int, embed_dim: int, dtype: str) -> int:
    per = num_patches * (embed_dim + 4) if dtype == "float8_e4m3" else num_patches * embed_dim * 2
    return images * (per + 12)  # + the .idx entry


def plan(run, *, dtype: str = "bfloat16", caption_tokens: float = 20.0, conversation_tokens: float = 330.0,
         image_fraction: float = 0.94) -> list[SetPlan]:
    """Per kind of set the recipe reads: what one pass of its stages consumes."""
    m, d = run.model, run.data
    P, D = m.vision.num_patches, m.vision.embed_dim
    tok_bytes = 2 if m.vocab_size <= 65536 else 4
    text = SetPlan("text", list(d.text))
    caps = SetPlan("captions", list(d.captions))
    inst = SetPlan("instructions", list(d.instructions))
    for st in run.stages:
        mix = st.mixture
        if st.epochs and st.epoch_examples and mix.instructions > 0:
            inst.conversations = max(inst.conversations, st.epoch_examples)  # epochs repeat the same set
            continue
        text.tokens += int(st.tokens * mix.text)
        if mix.captions > 0:
            per = P + 2 + caption_tokens  # [P image][SEP] caption [EOD]
            caps.images += math.ceil(st.tokens * mix.captions / per)
        if mix.instructions > 0:
            inst.conversations += math.ceil(st.tokens * mix.instructions / (conversation_tokens + P * image_fraction))
    text.bytes = text.tokens * tok_bytes + text.tokens // 1000 * 12
    caps.tokens = int(caps.images * (caption_tokens + 1))
    caps.bytes = embed_bytes(caps.images, P, D, dtype) + caps.tokens * tok_bytes + caps.images * 12
    caps.notes.append(f"{caption_tokens:g} caption tokens per image, {P}x{D} patches in {dtype}")
    inst.images = int(inst.conversations * image_fraction)
    inst.tokens = int(inst.conversations * conversation_tokens)
    inst.bytes = (embed_bytes(inst.images, P, D, dtype) + inst.tokens * (tok_bytes + 1)
                  + inst.conversations * (24 + 8))
    inst.notes.append(f"{conversation_tokens:g} tokens per conversation, {image_fraction:.0%} with an image "
                      f"(their own embedding store)")
    return [s for s in (text, caps, inst) if s.tokens or s.images or s.conversations]


def free_bytes(root: str | Path) -> tuple[Path, int]:
    p = Path(root).expanduser().resolve()
    while not p.exists():
        p = p.parent
    return p, shutil.disk_usage(p).free


def report(run, sets: Sequence[SetPlan], inputs: Sequence[str] = ()) -> tuple[str, bool]:
    """(the printed plan, whether it fits on the disk under data.root)."""
    lines = [f"{'set':<14} {'names':<24} {'tokens':>16} {'images':>12} {'conversations':>14} {'bytes':>10}"]
    for s in sets:
        lines.append(f"{s.kind:<14} {','.join(s.names)[:24]:<24} {s.tokens:>16,} {s.images:>12,} "
                     f"{s.conversations:>14,} {_human(s.bytes):>10}")
        lines += [f"{'':<14} ({n})" for n in s.notes]
    total = sum(s.bytes for s in sets)
    where, free = free_bytes(run.data.root)
    lines.append(f"{'total':<14} {'':<24} {'':>16} {'':>12} {'':>14} {_human(total):>10}")
    lines.append(f"free disk under {where}: {_human(free)}" + ("" if total <= free else
                 f"  -- NOT ENOUGH: {_human(total - free)} short (--dtype float8_e4m3 halves the embeddings)"))
    for spec in inputs:
        from megavlm.prep.inputs import expand_inputs

        kind, _, pattern = spec.partition("=")
        files = expand_inputs([pattern])
        size = sum(f.stat().st_size for f in files)
        lines.append(f"inputs {kind}: {len(files):,} files, {_human(size)} ({pattern})")
    return "\n".join(lines), total <= free


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    from megavlm.config import ConfigError, load_config
    from megavlm.data.indexed import DataError

    ap = argparse.ArgumentParser(prog="megavlm prepare --plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", action="store_true", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float8_e4m3"], default="bfloat16",
                    help="embedding store dtype to plan for")
    ap.add_argument("--caption-tokens", type=float, default=20.0, help="mean caption length in tokens")
    ap.add_argument("--conversation-tokens", type=float, default=330.0,
                    help="mean conversation length in tokens (text only)")
    ap.add_argument("--image-fraction", type=float, default=0.94,
                    help="conversations with an image (LLaVA-665k: 625k of 665k)")
    ap.add_argument("--inputs", action="append", default=[], metavar="KIND=GLOB",
                    help="also count the input shards, e.g. captions='datacomp/{00000..01023}.tar'")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    try:
        run = load_config(a.config, a.overrides)
        text, fits = report(run, plan(run, dtype=a.dtype, caption_tokens=a.caption_tokens,
                                      conversation_tokens=a.conversation_tokens,
                                      image_fraction=a.image_fraction), a.inputs)
    except (ConfigError, DataError) as e:
        print(f"megavlm: error: {e}")
        return 2
    print(f"data plan of {a.config} (before any work; estimates from the recipe):")
    print(text)
    return 0 if fits else 3
