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
cached: the .deb files and their extraction under ``~/.cache/megavlm/debs``, the raw corpora under
``<root>/raw`` (``raw/raw.json`` marks them complete), the prepared sets under ``root``.
``<root>/demo.json`` is the cache's manifest: per set its kind, build parameters (tokenizer
vocabulary, encoder, image size, patch count, resize mode), what it was built from, and per file
its size and (small files) content hash. A set absent from it, built otherwise, or whose files
changed is stale: it is rebuilt alone and never trusted meanwhile.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from megavlm.config import ConfigError, DataConfig, VisionConfig
from megavlm.data.indexed import DataError, file_record
from megavlm.data.tokenizer import load_tokenizer, train_sentencepiece
from megavlm.demo.short_vqa import NAME as SHORT_VQA
from megavlm.encoders import EfficientNetLite0, encode_images, read_image_list
from megavlm.prep.conversations import preprocess_conversations
from megavlm.prep.textprep import preprocess_text
from megavlm.run_folder import set_files
from megavlm.demo.debian import (PACKAGES, bible_chapters, default_cache, fetch_package, idx_images,
                                 idx_labels, wordnet_definition, wordnet_glosses)

DEMO_VERSION = 1
"""The marker format of earlier megavlm versions (top-level version/num_patches/embed_dim/full), still
written beside the manifest once a build is complete so that older checkouts sharing the cache
do not rebuild it; this version never trusts those keys alone."""
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


MANIFEST_VERSION = 2
ENCODER = "efficientnet-lite0"
CONVERSATION_FORMAT = "megavlm-conversations/2"
"""megavlm.prep.conversations.FORMAT (kept literal: this module is imported without prep)."""


def _marker(data: DataConfig) -> Path:
    return data.resolve("demo.json")


def demo_set_names() -> dict[str, tuple[str, ...]]:
    """Per kind, the set names the demo builder makes (each also as a ``_heldout`` twin; the
    short-answer VQA set is built on top of the corpus by megavlm.demo.short_vqa)."""
    base = {"text": ("text",), "captions": ("captions",), "instructions": ("instructions", SHORT_VQA)}
    return {k: tuple(n + suffix for n in names for suffix in ("", "_heldout")) for k, names in base.items()}


def check_set_names(data: DataConfig) -> None:
    """Refuse a ``build: demo`` recipe that names a set the builder does not make: a typo such as
    ``data.instructions=[instuctions]`` used to build a fresh copy under the typo'd name and train on
    it. Raises ConfigError naming the key, the set and the sets the builder makes."""
    made = demo_set_names()
    bad = [f"data.{kind}: {name!r}" for kind in made for name in getattr(data, kind) if name not in made[kind]]
    if bad:
        raise ConfigError("data.build=demo builds only its own sets; " + ", ".join(bad)
                          + " is not one of them (it makes " + "; ".join(
                              f"{k}: {', '.join(v)}" for k, v in made.items()) + ")")


def corpus_sets(data: DataConfig) -> dict[str, Path]:
    """The prefixes the demo corpus writes (each also with a ``_heldout`` twin): text, captions and
    instructions (the short-answer VQA set is built on top of them by megavlm.demo.short_vqa). A set
    name the builder does not make is an error (:func:`check_set_names`)."""
    check_set_names(data)
    inst = next((n for n in data.instructions if n != SHORT_VQA), "instructions")
    return {"text": data.resolve(data.text[0] if data.text else "text"),
            "captions": data.resolve(data.captions[0] if data.captions else "captions"),
            "instructions": data.resolve(inst)}


def _plan(data: DataConfig, vision: VisionConfig, full: bool, vocab_size: int) -> list[tuple[str, str, Path, dict]]:
    """(set name, kind, prefix, build parameters) of every set, in build order. A set's parameters
    name what it was built from (the tokenizer's and the caption store's content hashes), so a
    rebuilt tokenizer makes every later set stale."""
    sets = corpus_sets(data)
    root = Path(data.root).expanduser()
    side = math.isqrt(vision.num_patches)
    tok = data.resolve(data.tokenizer)
    out = [(_name(tok, root), "tokenizer", tok, {"vocab_size": vocab_size, "full": full})]
    for suffix in ("", "_heldout"):
        out.append((_name(Path(f"{sets['text']}{suffix}"), root), "text", Path(f"{sets['text']}{suffix}"),
                    {"raw": f"text{suffix}.jsonl", "full": full}))
    for suffix in ("", "_heldout"):
        cap = Path(f"{sets['captions']}{suffix}")
        out.append((_name(cap, root), "captions", cap,
                    {"raw": f"captions{suffix}.jsonl", "full": full, "encoder": ENCODER,
                     "image_size": 32 * side, "num_patches": vision.num_patches,
                     "embed_dim": vision.embed_dim, "resize": "square"}))
    for suffix in ("", "_heldout"):
        inst = Path(f"{sets['instructions']}{suffix}")
        out.append((_name(inst, root), "instructions", inst,
                    {"raw": f"conversations{suffix}.json", "full": full,
                     "embeds": _name(Path(f"{sets['captions']}{suffix}"), root),
                     "format": CONVERSATION_FORMAT}))  # sets of an older format are rebuilt
    return out


def _name(p: Path, root: Path) -> str:
    try:
        return str(p.relative_to(root))
    except ValueError:
        return str(p)


def _want(vision: VisionConfig, full: bool) -> dict:  # the legacy marker's keys
    return {"version": DEMO_VERSION, "num_patches": vision.num_patches, "embed_dim": vision.embed_dim,
            "full": full}


def read_manifest(data: DataConfig) -> dict:
    """``<root>/demo.json``: {"version", "sets": {name: {"kind", "params", "inputs", "files"}}};
    an unreadable or older marker counts as empty (nothing in it is trusted)."""
    m = _marker(data)
    try:
        have = json.loads(m.read_text())
    except (OSError, ValueError):
        return {"manifest_version": MANIFEST_VERSION, "sets": {}}
    if have.get("manifest_version") != MANIFEST_VERSION or not isinstance(have.get("sets"), dict):
        return {"manifest_version": MANIFEST_VERSION, "sets": {}}
    return have


def _write_manifest(data: DataConfig, manifest: dict) -> None:
    m = _marker(data)
    tmp = m.with_name(".demo.json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    tmp.replace(m)


def _inputs(manifest: dict, name: str, kind: str, params: dict) -> dict:
    """What a set was built from: the manifest records of the sets it reads."""
    sets = manifest["sets"]
    tok = next((n for n, r in sets.items() if r.get("kind") == "tokenizer"), None)
    out = {} if kind == "tokenizer" else {"tokenizer": (sets.get(tok) or {}).get("files")}
    if kind == "instructions":
        out["embeds"] = (sets.get(params["embeds"]) or {}).get("files")
    return out


def stale_sets(data: DataConfig, vision: VisionConfig, *, full: bool = False,
               vocab_size: int = 8192) -> dict[str, str]:
    """Set name -> why it cannot be trusted (absent from the manifest, built with other parameters
    or from other inputs, or a file missing or changed since); empty: the cache is complete."""
    manifest = read_manifest(data)
    out: dict[str, str] = {}
    for name, kind, prefix, params in _plan(data, vision, full, vocab_size):
        rec = manifest["sets"].get(name)
        if rec is None:
            out[name] = "not in the manifest (never built)"
        elif rec.get("params") != params:
            diff = sorted(k for k in set(params) | set(rec.get("params", {}))
                          if params.get(k) != rec.get("params", {}).get(k))
            out[name] = f"built with other parameters ({', '.join(diff)})"
        elif rec.get("inputs") != _inputs(manifest, name, kind, params):
            out[name] = "built from another tokenizer or image store"
        elif any(n in out for n in _depends(manifest, kind, params)):
            out[name] = "an input set is stale"
        else:
            for f in set_files(kind, prefix):
                if not f.is_file():
                    out[name] = f"{f}: missing"
                    break
                if file_record(f) != rec["files"].get(f.name):
                    out[name] = f"{f}: changed since it was built"
                    break
    return out


def _depends(manifest: dict, kind: str, params: dict) -> list[str]:
    tok = [n for n, r in manifest["sets"].items() if r.get("kind") == "tokenizer"]
    return [] if kind == "tokenizer" else tok + ([params["embeds"]] if kind == "instructions" else [])


def is_built(data: DataConfig, vision: VisionConfig, *, full: bool = False, vocab_size: int = 8192) -> bool:
    """Whether ``data.root`` holds a complete, current demo corpus encoded for ``vision`` (reads only)."""
    return not stale_sets(data, vision, full=full, vocab_size=vocab_size)


def ensure_demo_corpus(data: DataConfig, vision: VisionConfig, *, full: bool = False,
                       cache: Optional[Path] = None, progress: bool = False, vocab_size: int = 8192) -> list[str]:
    """Build what is missing or stale of the demo corpus in ``data.root`` (``data.build == 'demo'``);
    returns the names of the sets it built (empty: the cache was complete).

    Each set is recorded in ``<root>/demo.json`` once written, with its build parameters and the
    size (and for small files the content hash) of each file; a set whose record does not match is
    rebuilt, alone, from the raw corpora under ``<root>/raw`` (downloaded only if those are absent).
    The image store's patch count follows ``vision.num_patches`` (EfficientNet-Lite0 at
    32*sqrt(P) px; the tiny recipe uses P=16 at 128 px) and ``vision.embed_dim`` must be 1280.
    Called by the preparation step (megavlm.prepare), never by the trainer.
    """
    if data.build != "demo":
        return []
    P = vision.num_patches
    side = math.isqrt(P)
    if not stale_sets(data, vision, full=full, vocab_size=vocab_size):
        return []
    if vision.embed_dim != 1280 or side * side != P:
        raise DataError(f"the demo corpus is encoded by EfficientNet-Lite0 (1280 wide, a square "
                        f"patch grid); model.vision has embed_dim={vision.embed_dim}, "
                        f"num_patches={P}: use embed_dim=1280 and num_patches=16 (128 px) or 49 (224 px)")
    root = Path(data.root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".demo.lock", "w") as lock:  # ranks of one job (or two jobs) build it once
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build(data, vision, full, cache, progress, vocab_size)


def _raw(root: Path, cache: Optional[Path], full: bool) -> dict:
    """The raw corpora (``<root>/raw``), built from the Debian packages unless ``raw/raw.json`` says
    they are there for this ``full`` setting."""
    raw = root / "raw"
    marker = raw / "raw.json"
    try:
        have = json.loads(marker.read_text())
        if have.get("full") == full:
            return have
    except (OSError, ValueError):
        pass
    counts = build_raw(raw, cache or default_cache(), full=full)
    tmp = raw / ".raw.json.tmp"
    tmp.write_text(json.dumps({**counts, "full": full}))
    tmp.replace(marker)
    return {**counts, "full": full}


def _build(data: DataConfig, vision: VisionConfig, full: bool, cache: Optional[Path], progress: bool,
           vocab_size: int) -> list[str]:

    t0 = time.perf_counter()
    root = Path(data.root).expanduser()
    raw = root / "raw"
    stale = stale_sets(data, vision, full=full, vocab_size=vocab_size)
    _log(f"building {len(stale)} demo set(s) in {root}: " + "; ".join(f"{k}: {v}" for k, v in stale.items()))
    counts = _raw(root, cache, full)
    manifest = read_manifest(data)
    manifest["raw"] = counts
    for k in ("version", "num_patches", "embed_dim", "full"):  # the legacy marker: only when complete
        manifest.pop(k, None)
    tok_path = data.resolve(data.tokenizer)
    if tok_path.suffix == ".json":
        raise DataError(f"the demo trains a sentencepiece tokenizer; data.tokenizer={data.tokenizer} "
                        f"must not be a tokenizer.json")
    enc = None
    built: list[str] = []
    for name, kind, prefix, params in _plan(data, vision, full, vocab_size):
        if name not in stale_sets(data, vision, full=full, vocab_size=vocab_size):
            continue
        manifest["sets"].pop(name, None)
        _write_manifest(data, manifest)  # a set being rebuilt is never trusted meanwhile
        if kind == "tokenizer":
            train_txt = raw / "tokenizer_train.txt"
            with open(train_txt, "w") as f:
                for src in ("text.jsonl", "captions.jsonl"):
                    for line in open(raw / src):
                        rec = json.loads(line)
                        f.write((rec.get("text") or rec.get("caption")).replace("\n", " ") + "\n")
                for conv in json.loads((raw / "conversations.json").read_text()):
                    for t in conv["conversations"]:
                        f.write(t["value"].replace("<image>", "").replace("\n", " ") + "\n")
            tok = train_sentencepiece([train_txt], tok_path, vocab_size=vocab_size)
            _log(f"tokenizer: {tok.vocab_size} ids ({time.perf_counter() - t0:.0f}s)")
        elif kind == "text":
            preprocess_text([raw / params["raw"]], prefix, tok_path, workers=1, progress=progress)
        elif kind == "captions":
            enc = enc or EfficientNetLite0(image_size=params["image_size"])
            threads = torch.get_num_threads()
            torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
            try:
                st = encode_images(read_image_list(raw / params["raw"]), prefix, enc,
                                   tokenizer=load_tokenizer(tok_path), decoder="pil", progress=progress)
            finally:
                torch.set_num_threads(threads)
            _log(f"encoded {st.images} images of {name} at {st.images_per_s:.0f}/s "
                 f"({time.perf_counter() - t0:.0f}s)")
        else:
            cap_jsonl = raw / params["raw"].replace("conversations", "captions").replace(".json", ".jsonl")
            _check_image_keys(raw / params["raw"], cap_jsonl)
            preprocess_conversations([raw / params["raw"]], prefix, load_tokenizer(tok_path),
                                     embeds=str(data.resolve(params["embeds"])) + ".embeds")
        manifest["sets"][name] = {"kind": kind, "params": params,
                                  "inputs": _inputs(manifest, name, kind, params),
                                  "files": {f.name: file_record(f) for f in set_files(kind, prefix)}}
        _write_manifest(data, manifest)
        built.append(name)
    if not stale_sets(data, vision, full=full, vocab_size=vocab_size):
        manifest.update({"version": DEMO_VERSION, "num_patches": vision.num_patches,
                         "embed_dim": vision.embed_dim, "full": full})
        _write_manifest(data, manifest)
    _log(f"demo corpus ready in {time.perf_counter() - t0:.0f}s (built {', '.join(built) or 'nothing'})")
    return built


def _check_image_keys(conv_json: Path, captions_jsonl: Path) -> None:
    """Conversation ``image`` fields name images as the caption JSONL does (the store's keys)."""
    keys = {json.loads(l)["image"] for l in open(captions_jsonl)}
    convs = json.loads(conv_json.read_text())
    for c in convs:
        if c["image"] not in keys:
            raise DataError(f"{conv_json}: {c['id']} names {c['image']}, not in {captions_jsonl}")
