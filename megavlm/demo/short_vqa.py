"""Short-answer visual questions for the demo's instruction mix (the LLaVA-1.5 recipe, offline).

Why: the demo corpus's own conversations answer "What is shown in this image?" with a whole
caption ("A photo of a coat: an outer garment ..."), while the benchmark prompt of the paper's
vision suite (and of the offline ``fashion_vqa`` / ``offline_pope``) asks for "a single word or
phrase". A model tuned only on long answers can see perfectly well and still score zero under
exact-match scoring. LLaVA-1.5 fixes this by mixing VQA data that carries exactly that prompt
into instruction tuning; this module does the same with the demo's *training* images and their
labels (held-out images are never used): per image one "what is shown" question answered with
its label and one balanced yes/no presence question.

The dataset is written next to the demo corpus as ``instructions_vqa`` (tokens, masks, image
indices into the training caption store) by megavlm.prep.conversations, once, under a file lock.
A recipe uses it by listing it in ``data.instructions`` (launch/configs/demo.yaml does).
"""

from __future__ import annotations

import fcntl
import json
import re
from pathlib import Path
from typing import Optional

import numpy as np

from megavlm.config import DataConfig
from megavlm.data.indexed import file_record
from megavlm.data.tokenizer import load_tokenizer
from megavlm.prep.conversations import preprocess_conversations
from megavlm.run_folder import set_files

NAME = "instructions_vqa"
VERSION = 3  # 3: conversations name images by key (megavlm.prep.conversations.FORMAT)
SUFFIX = "\nAnswer the question using a single word or phrase."
_FASHION = re.compile(r"^A photo of an? ([^:]+):")
_ARTICLES = ("a", "an", "the", "some")


def label_of(caption: str) -> Optional[str]:
    """A short answer for a caption: the Fashion-MNIST class, or a Tux Paint caption of at most
    three words without its article ("A wapiti." -> "wapiti"); None when there is no short label."""
    m = _FASHION.match(caption)
    if m:
        return m.group(1).strip().lower()
    words = re.sub(r"[.!?]+$", "", caption.strip()).split()
    if words and words[0].lower() in _ARTICLES:
        words = words[1:]
    if not words or len(words) > 3 or any(not re.fullmatch(r"[A-Za-z'-]+", w) for w in words):
        return None
    return " ".join(words).lower()


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def conversations(captions_jsonl: Path, seed: int = 0) -> list[dict]:
    """Two single-turn records per labelled image: what is shown (-> label), is there X (-> Yes/No)."""
    recs = [json.loads(line) for line in Path(captions_jsonl).read_text().splitlines()]
    labelled = [(r["image"], lab) for r in recs if (lab := label_of(r["caption"]))]
    labels = sorted({lab for _, lab in labelled})
    rng = np.random.default_rng(seed)
    out = []
    for k, (image, label) in enumerate(labelled):
        out.append({"id": f"vqa-what-{k}", "image": image, "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown in the image?" + SUFFIX},
            {"from": "gpt", "value": label}]})
        obj = label
        if k % 2 == 1 and len(labels) > 1:
            others = [l for l in labels if l != label]
            obj = others[int(rng.integers(len(others)))]
        out.append({"id": f"vqa-yesno-{k}", "image": image, "conversations": [
            {"from": "human", "value": f"<image>\nIs there {_article(obj)} {obj} in the image?" + SUFFIX},
            {"from": "gpt", "value": "Yes" if obj == label else "No"}]})
    return out


def _record(data: DataConfig) -> dict:
    """What the set is built from and holds: its files and the caption store's (content records)."""

    cap = data.resolve(data.captions[0] if data.captions else "captions")
    files = {f.name: file_record(f) for f in set_files("instructions", data.resolve(NAME)) if f.is_file()}
    store = {f.name: file_record(f) for f in set_files("captions", cap)[2:] if f.is_file()}
    return {"files": files, "embeds": store}


def is_built(data: DataConfig) -> bool:
    """Whether ``<root>/instructions_vqa`` is built at this version, its files are those recorded
    when it was built, and the caption store it points into is unchanged (reads only)."""
    marker = Path(f"{data.resolve(NAME)}.built.json")
    try:
        have = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if have.get("version") != VERSION:
        return False
    rec = _record(data)
    return have.get("files") == rec["files"] and have.get("embeds") == rec["embeds"] and len(rec["files"]) == 6


def ensure_short_vqa(data: DataConfig) -> Optional[Path]:
    """Build ``<root>/instructions_vqa`` if the recipe lists it and it is not built yet; returns its prefix."""
    if NAME not in data.instructions:
        return None

    root = Path(data.root).expanduser()
    prefix = data.resolve(NAME)
    marker = Path(f"{prefix}.built.json")
    with open(root / ".short_vqa.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_built(data):
            return prefix
        convs = conversations(root / "raw" / "captions.jsonl")
        src = root / "raw" / f"{NAME}.json"
        src.write_text(json.dumps(convs))
        cap = data.resolve(data.captions[0] if data.captions else "captions")
        st = preprocess_conversations([src], prefix, load_tokenizer(data.resolve(data.tokenizer)),
                                      embeds=f"{cap}.embeds")
        tmp = marker.with_name(marker.name + ".tmp")
        tmp.write_text(json.dumps({"version": VERSION, "conversations": st.conversations, **_record(data)}))
        tmp.replace(marker)
    return prefix
