"""The small offline demo corpus, built from real data that ships in Debian packages.

Why here: the tiny CPU recipe must train on real text and real images on a machine that reaches
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

import gzip
import json
import math
import os
import re
import shutil
import struct
import subprocess
import time
import zlib
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from megavlm.config import DataConfig, VisionConfig
from megavlm.data.indexed import DataError

DEMO_VERSION = 1
PACKAGES = {
    "sword-text-web": ["./usr/share/sword/modules/texts/ztext/*"],
    "wordnet-base": ["./usr/share/wordnet/data.*", "./usr/share/wordnet/index.*"],
    "dataset-fashion-mnist": ["./usr/share/datasets/fashion-mnist/*"],
    "tuxpaint-stamps-default": ["./usr/share/tuxpaint/stamps/*.png", "./usr/share/tuxpaint/stamps/*.txt"],
}
FASHION_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                  "Sneaker", "Bag", "Ankle boot"]
_FASHION_LEMMAS = [["tee_shirt", "jersey"], ["trouser", "trousers"], ["pullover"], ["dress"], ["coat"],
                   ["sandal"], ["shirt"], ["sneaker", "gym_shoe"], ["bag"], ["boot"]]


def default_cache() -> Path:
    return Path(os.environ.get("MEGAVLM_CACHE", "~/.cache/megavlm")).expanduser() / "debs"


def _log(msg: str) -> None:
    print(f"[megavlm demo] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# fetching the Debian packages


def fetch_package(name: str, cache: Path) -> Path:
    """Download ``name`` with apt-get (once) and extract the files we use; return the tree."""
    cache.mkdir(parents=True, exist_ok=True)
    tree = cache / "extract" / name
    if (tree / ".complete").is_file():
        return tree
    debs = sorted(cache.glob(f"{name}_*.deb"))
    if not debs:
        if shutil.which("apt-get") is None:
            raise RuntimeError(f"the demo corpus needs the Debian package {name}, and apt-get is not "
                               f"available; put {name}_*.deb into {cache}")
        for attempt in range(2):
            r = subprocess.run(["apt-get", "download", name], cwd=cache, capture_output=True, text=True)
            debs = sorted(cache.glob(f"{name}_*.deb"))
            if debs:
                break
            if attempt == 0:  # package lists may be missing on a fresh machine
                subprocess.run(["apt-get", "update"], capture_output=True, text=True)
        if not debs:
            raise RuntimeError(f"apt-get download {name} failed: {r.stderr.strip()[-500:]}")
    tmp = tree.with_name(f".{name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    deb = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(debs[-1])], stdout=subprocess.PIPE)
    tar = subprocess.run(["tar", "-x", "-C", str(tmp), "--wildcards", *PACKAGES[name]],
                         stdin=deb.stdout, capture_output=True, text=True)
    deb.stdout.close()  # type: ignore[union-attr]
    if deb.wait() != 0 or tar.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"extracting {debs[-1]} failed: {tar.stderr.strip()[-500:]}")
    (tmp / ".complete").touch()
    shutil.rmtree(tree, ignore_errors=True)
    tmp.rename(tree)
    return tree


# --------------------------------------------------------------------------------------------
# raw corpora


_NOTE = re.compile(r"<note\b.*?</note>", re.S)
_TITLE = re.compile(r"<title\b.*?</title>", re.S)
_TAG = re.compile(r"<[^>]*>")
_CHAPTER = re.compile(r'<chapter\b[^>]*\bsID="([^"]+)"[^>]*/>')
_SPACE = re.compile(r"\s+")


def bible_chapters(tree: Path) -> Iterator[tuple[str, str]]:
    """(osis id, text) per chapter of the World English Bible (SWORD zText module)."""
    base = tree / "usr/share/sword/modules/texts/ztext/engWEB2015eb"
    for part in ("ot", "nt"):
        bzs = (base / f"{part}.bzs").read_bytes()
        bzz = (base / f"{part}.bzz").read_bytes()
        for b in range(len(bzs) // 12):
            off, csize, _ = struct.unpack_from("<III", bzs, b * 12)
            xml = zlib.decompress(bzz[off:off + csize]).decode("utf-8")
            xml = _TITLE.sub(" ", _NOTE.sub(" ", xml))
            pieces = _CHAPTER.split(xml)
            ids = ["intro"] + pieces[1::2]
            for cid, body in zip(ids, pieces[0::2]):
                text = _SPACE.sub(" ", _TAG.sub(" ", body)).strip()
                text = re.sub(r" ([,.;:!?’”)])", r"\1", text)
                text = re.sub(r"([“‘(]) ", r"\1", text)
                if len(text) > 200:
                    yield cid, text


def wordnet_glosses(tree: Path) -> Iterator[tuple[str, str]]:
    """(lemma, 'lemma: gloss') for every synset in WordNet 3.0 (first lemma of the synset)."""
    pos_name = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}
    for pos in ("noun", "verb", "adj", "adv"):
        with open(tree / f"usr/share/wordnet/data.{pos}", encoding="latin-1") as f:
            for line in f:
                if line.startswith("  ") or " | " not in line:
                    continue
                head, gloss = line.split(" | ", 1)
                word = head.split()[4].replace("_", " ")
                yield word, f"{word} ({pos_name[pos]}): {gloss.strip()}"


def wordnet_definition(tree: Path, lemmas: list[str]) -> str:
    """Definition (gloss without examples) of the first noun sense of the first known lemma."""
    index = tree / "usr/share/wordnet/index.noun"
    data = tree / "usr/share/wordnet/data.noun"
    wanted = {l.lower(): n for n, l in enumerate(lemmas)}
    found: dict[int, int] = {}
    with open(index, encoding="latin-1") as f:
        for line in f:
            w = line.split(" ", 1)[0]
            if w in wanted:
                found[wanted[w]] = _first_offset(line)
    if not found:
        raise DataError(f"{index}: none of {lemmas} found")
    with open(data, "rb") as f:
        f.seek(found[min(found)])
        gloss = f.readline().decode("latin-1").split(" | ", 1)[1]
    return gloss.split('; "')[0].strip().rstrip(";")


def _first_offset(index_line: str) -> int:
    parts = index_line.split()
    p_cnt = int(parts[3])
    return int(parts[4 + p_cnt + 2])  # lemma pos synset_cnt p_cnt [ptrs] sense_cnt tagsense_cnt offsets


def _idx_images(path: Path) -> np.ndarray:
    raw = gzip.decompress(path.read_bytes())
    if len(raw) < 16 or struct.unpack(">I", raw[:4])[0] != 2051:
        raise DataError(f"{path}: not an IDX image file")
    _, n, h, w = struct.unpack(">IIII", raw[:16])
    if len(raw) != 16 + n * h * w:
        raise DataError(f"{path}: truncated IDX file ({len(raw)} bytes, header says {16 + n * h * w})")
    return np.frombuffer(raw, np.uint8, n * h * w, 16).reshape(n, h, w)


def _idx_labels(path: Path) -> np.ndarray:
    raw = gzip.decompress(path.read_bytes())
    if len(raw) < 8 or struct.unpack(">I", raw[:4])[0] != 2049:
        raise DataError(f"{path}: not an IDX label file")
    n = struct.unpack(">I", raw[4:8])[0]
    if len(raw) != 8 + n:
        raise DataError(f"{path}: truncated IDX file ({len(raw)} bytes, header says {8 + n})")
    return np.frombuffer(raw, np.uint8, n, 8)


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
        X, Y = _idx_images(fm / imgs), _idx_labels(fm / labs)
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


def ensure_demo_corpus(data: DataConfig, vision: VisionConfig, *, full: bool = False,
                       cache: Optional[Path] = None, progress: bool = False) -> None:
    """Build the demo corpus into ``data.root`` unless it is there already (``data.build == 'demo'``).

    The image store's patch count follows ``vision.num_patches`` (EfficientNet-Lite0 at
    32*sqrt(P) px; the tiny recipe uses P=16 at 128 px) and ``vision.embed_dim`` must be 1280.
    """
    if data.build != "demo":
        return
    P = vision.num_patches
    side = math.isqrt(P)
    want = {"version": DEMO_VERSION, "num_patches": P, "embed_dim": vision.embed_dim, "full": full}
    if _complete(_marker(data), want):
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
        if not _complete(_marker(data), want):
            _build(data, want, side, full, cache, progress)


def _complete(marker: Path, want: dict) -> bool:
    if not marker.is_file():
        return False
    have = json.loads(marker.read_text())
    return all(have.get(k) == v for k, v in want.items())


def _build(data: DataConfig, want: dict, side: int, full: bool, cache: Optional[Path], progress: bool) -> None:
    marker = _marker(data)
    from megavlm.data.conversations import preprocess_conversations
    from megavlm.data.encoders import EfficientNetLite0, encode_images, read_image_list
    from megavlm.data.textprep import preprocess_text
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
    text_prefix = data.resolve(data.text[0] if data.text else "text")
    preprocess_text([raw / "text.jsonl"], text_prefix, tok_path, workers=1, progress=progress)
    preprocess_text([raw / "text_heldout.jsonl"], f"{text_prefix}_heldout", tok_path, progress=progress)
    enc = EfficientNetLite0(image_size=32 * side)
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    try:
        cap_prefix = data.resolve(data.captions[0] if data.captions else "captions")
        for suffix in ("", "_heldout"):
            st = encode_images(read_image_list(raw / f"captions{suffix}.jsonl"), f"{cap_prefix}{suffix}", enc,
                               tokenizer=tok, decoder="pil", progress=progress)
            _log(f"encoded {st.images} images{suffix} at {st.images_per_s:.0f}/s "
                 f"({time.perf_counter() - t0:.0f}s)")
    finally:
        torch.set_num_threads(threads)
    inst_prefix = data.resolve(data.instructions[0] if data.instructions else "instructions")
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
