"""The small offline demo corpus, built from real data that ships in Debian packages.

Why: the tiny CPU recipe must train on real text and real images on a machine that reaches
only package registries. Sources (see shared ASSETS.md): World English Bible (``sword-text-web``)
and WordNet glosses (``wordnet-base``) for text; Tux Paint stamps with their captions
(``tuxpaint-stamps-default``) and Fashion-MNIST with captions made from the label and its WordNet
gloss (``dataset-fashion-mnist``) for images; LLaVA-format conversations made from the same labels
and captions. Every corpus also gets a held-out split.

The raw corpora are written in the standard input formats (JSONL text, JSONL image+caption,
LLaVA JSON) under ``<root>/raw`` and then go through the same library functions as the tools
(tokenizer training, preprocess_text, encode_images, preprocess_conversations). Everything is
cached: the .deb files and their extraction under ``~/.cache/megavlm/debs``, the prepared files
under ``root``; ``<root>/demo.json`` is written last and marks a complete build.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np

from megavlm.config import DataConfig, VisionConfig
from megavlm.data.indexed import DataError
from megavlm.demo.debian import (PACKAGES, bible_chapters, default_cache, fetch_package, idx_images,
                                 idx_labels, wordnet_definition, wordnet_glosses)

DEMO_VERSION = 1
FASHION_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                  "Sneaker", "Bag", "Ankle boot"]
_FASHION_LEMMAS = [["tee_shirt", "jersey"], ["trouser", "trousers"], ["pullover"], ["dress"], ["coat"],
                   ["sandal"], ["shirt"], ["sneaker", "gym_shoe"], ["bag"], ["boot"]]


def _log(msg: str) -> None:
    print(f"[megavlm demo] {msg}", flush=True)


def _label_of(caption: str) -> str:
    """'A badger.' -> 'badger'; '' when the caption is not a short noun phrase."""
    words = caption.strip().rstrip(".!").split()
    if words and words[0].lower() in ("a", "an", "the", "some"):
        words = words[1:]
    return " ".join(words).lower() if 0 < len(words) <= 4 else ""


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def build_raw(raw: Path, cache: Path, *, full: bool = False, seed: int = 0) -> dict:
    """Write the raw corpora in the tools' input formats under ``raw``; return counts."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    raw.mkdir(parents=True, exist_ok=True)
    trees = {p: fetch_package(p, cache) for p in PACKAGES}
    counts: dict[str, int] = {}

    # text: Bible chapters + WordNet glosses (a sample unless full), 2 % held out
    docs = [t for _, t in bible_chapters(trees["sword-text-web"])]
    glosses = [g for _, g in wordnet_glosses(trees["wordnet-base"])]
    if not full:
        glosses = [glosses[i] for i in sorted(rng.choice(len(glosses), 4000, replace=False))]
    for i in range(0, len(glosses), 20):  # 20 glosses to a document: a small dictionary page
        docs.append("\n".join(glosses[i:i + 20]))
    order = rng.permutation(len(docs))
    held = set(order[:max(4, len(docs) // 50)].tolist())
    for name, keep in (("text", False), ("text_heldout", True)):
        with open(raw / f"{name}.jsonl", "w") as f:
            for i, d in enumerate(docs):
                if (i in held) == keep:
                    f.write(json.dumps({"text": d}) + "\n")
    counts["text_documents"] = len(docs)

    # images: Tux Paint stamps (captioned, not letters/digits) + Fashion-MNIST
    img_dir = raw / "images"
    img_dir.mkdir(exist_ok=True)
    records: list[dict] = []
    stamps = trees["tuxpaint-stamps-default"] / "usr/share/tuxpaint/stamps"
    for png in sorted(stamps.rglob("*.png")):
        if "symbols" in png.relative_to(stamps).parts:
            continue
        txt = png.with_suffix(".txt")
        if not txt.is_file():
            continue
        lines = txt.read_bytes().decode("utf-8", errors="replace").splitlines()
        cap = lines[0].strip() if lines else ""
        if not cap:
            continue
        label = _label_of(cap) or png.stem.rstrip("-0123456789").replace("_", " ").replace("-", " ")
        if not label:
            continue
        records.append({"image": str(png), "caption": cap, "label": label, "source": "tuxpaint"})
    fm = trees["dataset-fashion-mnist"] / "usr/share/datasets/fashion-mnist"
    defs = [wordnet_definition(trees["wordnet-base"], l) for l in _FASHION_LEMMAS]
    per_class = 6000 if full else 100
    for split, (imgs, labs) in (("train", ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")),
                                ("test", ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"))):
        X, Y = idx_images(fm / imgs), idx_labels(fm / labs)
        n = per_class if split == "train" else max(20, per_class // 5)
        for c, label in enumerate(FASHION_LABELS):
            for j in np.flatnonzero(Y == c)[:n]:
                p = img_dir / f"fashion-{split}-{j:05d}.png"
                if not p.is_file():
                    Image.fromarray(X[j]).save(p)
                word = label.split("/")[0].lower()
                cap = f"A photo of {_article(word)} {word}: {defs[c]}."
                records.append({"image": str(p), "caption": cap, "label": word,
                                "source": f"fashion-{split}"})
    rng.shuffle(records)  # type: ignore[arg-type]
    is_held = [r["source"] == "fashion-test" or (r["source"] == "tuxpaint" and i % 10 == 0)
               for i, r in enumerate(records)]
    held_img = [r for r, h in zip(records, is_held) if h]
    train_img = [r for r, h in zip(records, is_held) if not h]
    labels = sorted({r["label"] for r in records})
    for name, recs in (("captions", train_img), ("captions_heldout", held_img)):
        with open(raw / f"{name}.jsonl", "w") as f:
            for r in recs:
                f.write(json.dumps({"image": r["image"], "caption": r["caption"]}) + "\n")
        convs = [_conversation(r, labels, rng, k) for k, r in enumerate(recs)]
        (raw / f"conversations{'_heldout' if 'held' in name else ''}.json").write_text(json.dumps(convs))
        counts[name] = len(recs)
    return counts


def _conversation(rec: dict, labels: list[str], rng: np.random.Generator, k: int) -> dict:
    kind = k % 3
    label = rec["label"]
    if kind == 0:
        q, a = "What is shown in this image?", rec["caption"]
    elif kind == 1:
        other = label if rng.random() < 0.5 else labels[int(rng.integers(len(labels)))]
        q = f"Is there {_article(other)} {other} in the image? Answer yes or no."
        a = "Yes." if other == label else "No."
    else:
        q, a = "Describe the image in one sentence.", rec["caption"]
    turns = [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]
    if kind == 1:
        turns += [{"from": "human", "value": "What is it, then?"},
                  {"from": "gpt", "value": f"It is {_article(label)} {label}."}]
    return {"id": f"demo-{k}", "image": rec["image"], "conversations": turns}


# --------------------------------------------------------------------------------------------
# the prepared corpus


def _marker(data: DataConfig) -> Path:
    return data.resolve("demo.json")


def corpus_sets(data: DataConfig) -> dict[str, Path]:
    """The prefixes the demo corpus writes (each also with a ``_heldout`` twin): the first text and
    caption set of ``data`` and the first instruction set that is not the short-answer VQA set
    (that one is built on top of the corpus by megavlm.demo.short_vqa)."""
    from megavlm.demo.short_vqa import NAME as SHORT_VQA

    inst = next((n for n in data.instructions if n != SHORT_VQA), "instructions")
    return {"text": data.resolve(data.text[0] if data.text else "text"),
            "captions": data.resolve(data.captions[0] if data.captions else "captions"),
            "instructions": data.resolve(inst)}


def _files(data: DataConfig) -> list[Path]:
    """Files a complete corpus holds (a marker whose files are gone is not trusted)."""
    sets = corpus_sets(data)
    out = [data.resolve(data.tokenizer)]
    for suffix in ("", "_heldout"):
        out += [Path(f"{sets['text']}{suffix}.idx"), Path(f"{sets['captions']}{suffix}.embeds.json"),
                Path(f"{sets['instructions']}{suffix}.meta.json")]
    return out


def _want(vision: VisionConfig, full: bool) -> dict:
    return {"version": DEMO_VERSION, "num_patches": vision.num_patches, "embed_dim": vision.embed_dim,
            "full": full}


def is_built(data: DataConfig, vision: VisionConfig, *, full: bool = False) -> bool:
    """Whether ``data.root`` holds a complete demo corpus encoded for ``vision`` (reads only)."""
    return _complete(data, _want(vision, full))


def ensure_demo_corpus(data: DataConfig, vision: VisionConfig, *, full: bool = False,
                       cache: Optional[Path] = None, progress: bool = False) -> None:
    """Build the demo corpus into ``data.root`` unless it is there already (``data.build == 'demo'``).

    The image store's patch count follows ``vision.num_patches`` (EfficientNet-Lite0 at
    32*sqrt(P) px; the tiny recipe uses P=16 at 128 px) and ``vision.embed_dim`` must be 1280.
    Called by the preparation step (megavlm.demo.prepare), never by the trainer.
    """
    if data.build != "demo":
        return
    P = vision.num_patches
    side = math.isqrt(P)
    want = _want(vision, full)
    if _complete(data, want):
        return
    if vision.embed_dim != 1280 or side * side != P:
        raise DataError(f"the demo corpus is encoded by EfficientNet-Lite0 (1280 wide, a square "
                        f"patch grid); model.vision has embed_dim={vision.embed_dim}, "
                        f"num_patches={P}: use embed_dim=1280 and num_patches=16 (128 px) or 49 (224 px)")
    import fcntl

    root = Path(data.root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".demo.lock", "w") as lock:  # ranks of one job (or two jobs) build it once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _complete(data, want):
            _build(data, want, side, full, cache, progress)


def _complete(data: DataConfig, want: dict) -> bool:
    marker = _marker(data)
    if not marker.is_file():
        return False
    have = json.loads(marker.read_text())
    return all(have.get(k) == v for k, v in want.items()) and all(f.is_file() for f in _files(data))


def _build(data: DataConfig, want: dict, side: int, full: bool, cache: Optional[Path], progress: bool) -> None:
    marker = _marker(data)
    from megavlm.prep.conversations import preprocess_conversations
    from megavlm.prep.encoders import EfficientNetLite0, encode_images, read_image_list
    from megavlm.prep.textprep import preprocess_text
    from megavlm.data.tokenizer import load_tokenizer, train_sentencepiece

    t0 = time.perf_counter()
    root = Path(data.root).expanduser()
    raw = root / "raw"
    marker.unlink(missing_ok=True)
    _log(f"building the demo corpus in {root} (first use; cached afterwards)")
    counts = build_raw(raw, cache or default_cache(), full=full)
    tok_path = data.resolve(data.tokenizer)
    if tok_path.suffix == ".json":
        raise DataError(f"the demo trains a sentencepiece tokenizer; data.tokenizer={data.tokenizer} "
                        f"must not be a tokenizer.json")
    train_txt = raw / "tokenizer_train.txt"
    with open(train_txt, "w") as f:
        for name in ("text.jsonl", "captions.jsonl"):
            for line in open(raw / name):
                rec = json.loads(line)
                f.write((rec.get("text") or rec.get("caption")).replace("\n", " ") + "\n")
        for conv in json.loads((raw / "conversations.json").read_text()):
            for t in conv["conversations"]:
                f.write(t["value"].replace("<image>", "").replace("\n", " ") + "\n")
    tok = train_sentencepiece([train_txt], tok_path, vocab_size=8192)
    _log(f"tokenizer: {tok.vocab_size} ids ({time.perf_counter() - t0:.0f}s)")
    sets = corpus_sets(data)
    text_prefix = sets["text"]
    preprocess_text([raw / "text.jsonl"], text_prefix, tok_path, workers=1, progress=progress)
    preprocess_text([raw / "text_heldout.jsonl"], f"{text_prefix}_heldout", tok_path, progress=progress)
    enc = EfficientNetLite0(image_size=32 * side)
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    try:
        cap_prefix = sets["captions"]
        for suffix in ("", "_heldout"):
            st = encode_images(read_image_list(raw / f"captions{suffix}.jsonl"), f"{cap_prefix}{suffix}", enc,
                               tokenizer=tok, decoder="pil", progress=progress)
            _log(f"encoded {st.images} images{suffix} at {st.images_per_s:.0f}/s "
                 f"({time.perf_counter() - t0:.0f}s)")
    finally:
        torch.set_num_threads(threads)
    inst_prefix = sets["instructions"]
    for suffix in ("", "_heldout"):
        _check_image_keys(raw / f"conversations{suffix}.json", raw / f"captions{suffix}.jsonl")
        preprocess_conversations([raw / f"conversations{suffix}.json"], f"{inst_prefix}{suffix}",
                                 load_tokenizer(tok_path), embeds=f"{cap_prefix}{suffix}.embeds")
    tmp = marker.with_name(".demo.json.tmp")
    tmp.write_text(json.dumps({**want, **counts, "seconds": round(time.perf_counter() - t0, 1)}))
    tmp.replace(marker)
    _log(f"demo corpus ready in {time.perf_counter() - t0:.0f}s: {counts}")


def _check_image_keys(conv_json: Path, captions_jsonl: Path) -> None:
    """Conversation ``image`` fields name images as the caption JSONL does (the store's keys)."""
    keys = {json.loads(l)["image"] for l in open(captions_jsonl)}
    convs = json.loads(conv_json.read_text())
    for c in convs:
        if c["image"] not in keys:
            raise DataError(f"{conv_json}: {c['id']} names {c['image']}, not in {captions_jsonl}")
