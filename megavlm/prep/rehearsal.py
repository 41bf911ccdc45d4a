"""Tiny inputs in the paper's published formats, for the small-scale rehearsal of docs/paper-data.md.

    python -m megavlm.prep.rehearsal DIR

writes, under DIR: ``dclm/shard_000{0..3}.jsonl.zst`` (DCLM-baseline's format: JSON lines with a
``text`` field, zstd frames), ``datacomp/0000{0..3}.tar`` (img2dataset's WebDataset layout:
``KEY.jpg|png|webp``, ``KEY.txt`` alt text, ``KEY.syn.json`` with DataComp-DR-like ``syn_text``
captions), ``llava/llava_v1_5_mix665k.json`` with ``llava/images/{coco,gqa,...}`` (multi-turn and
text-only records, paths relative to the root), ``tokenizer.json`` (a byte-level BPE like GPT-NeoX's,
trained on the text) and ``siglip/`` (a tiny randomly initialised SigLIP vision tower: 16 patches of
width 24). Every file is written with its format's own library. Text is the World English Bible
when the demo's Debian package is cached, else synthetic words.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np


def _image(i: int, fmt: str, side: int = 48) -> bytes:
    from PIL import Image

    yy, xx = np.mgrid[:side, :side]
    arr = np.stack([(xx * (i % 7 + 2) * 3) % 256, (yy * 5 + 23 * i) % 256, np.full_like(xx, 37 * i % 256)], -1)
    b = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(b, format=fmt)
    return b.getvalue()


LABELS = ["a red square", "a blue stripe", "a green field", "a grey circle", "a striped pattern"]


def write_inputs(root: str | Path, *, images: int = 64, documents: int = 400) -> Path:
    import torch
    import webdataset as wds
    import zstandard
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from megavlm.bench.prep import local_documents, neox_style_tokenizer

    root = Path(root)
    docs, _ = local_documents(600_000)
    docs = (docs * (documents // max(1, len(docs)) + 1))[:documents]
    (root / "dclm").mkdir(parents=True, exist_ok=True)
    c = zstandard.ZstdCompressor()
    for k in range(4):
        part = docs[k::4]
        body = "".join(json.dumps({"text": d, "url": f"https://example.org/{k}/{j}"}) + "\n" for j, d in enumerate(part))
        (root / "dclm" / f"shard_{k:04d}.jsonl.zst").write_bytes(c.compress(body.encode()))
    neox_style_tokenizer(docs + LABELS, root / "tokenizer.json", 4000)
    (root / "datacomp").mkdir(exist_ok=True)
    fmts = [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")]
    per = images // 4
    for s in range(4):
        with wds.TarWriter(str(root / "datacomp" / f"{s:05d}.tar")) as w:
            for i in range(s * per, (s + 1) * per):
                ext, fmt = fmts[i % 3]
                lab = LABELS[i % len(LABELS)]
                w.write({"__key__": f"{i:09d}", ext: _image(i, fmt), "txt": f"photo {i}",
                         "syn.json": json.dumps({"syn_text": [f"{lab}, picture {i}", f"an image of {lab}",
                                                              f"{lab} in a photo"]})})
    img_root = root / "llava" / "images"
    recs = []
    for i in range(24):
        sub = ["coco/train2017", "gqa/images", "textvqa/train_images"][i % 3]
        (img_root / sub).mkdir(parents=True, exist_ok=True)
        rel = f"{sub}/{i:012d}.jpg"
        (img_root / rel).write_bytes(_image(100 + i, "JPEG"))
        lab = LABELS[(100 + i) % len(LABELS)]
        turns = [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": lab}]
        if i % 2:
            turns += [{"from": "human", "value": "Describe it in one word."}, {"from": "gpt", "value": lab.split()[-1]}]
        recs.append({"id": f"r{i}", "image": rel, "conversations": turns})
    for i in range(6):  # text-only, as ~40k of LLaVA-665k
        recs.append({"id": f"t{i}", "conversations": [{"from": "human", "value": f"Say the word {i}."},
                                                     {"from": "gpt", "value": f"{i}"}]})
    (root / "llava" / "llava_v1_5_mix665k.json").write_text(json.dumps(recs))
    # questions about the same images in the generic evaluation format (prepare -> train -> eval)
    qs = [{"question_id": r["id"], "image": r["image"], "question": "What is shown?",
           "answers": [r["conversations"][1]["value"]]} for r in recs if "image" in r]
    (root / "llava" / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
    torch.manual_seed(0)
    cfg = SiglipVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                             image_size=32, patch_size=8)
    SiglipVisionModel(cfg).save_pretrained(root / "siglip")
    return root


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__)
        raise SystemExit(2)
    print(f"rehearsal inputs in {write_inputs(sys.argv[1])}")
