"""Offline evaluation suites built from the real assets, so every checkpoint can be scored here.

The paper's benchmarks need the Hugging Face hub (text) and COCO/GQA/TextVQA images (vision);
this machine reaches neither. The offline suites ask the same kinds of questions of data that
ships in Debian packages (shared ASSETS.md) and that the demo corpus has already prepared:

Text (lm-eval tasks written as local YAML + JSONL, run by the real harness):
  * ``megavlm_wordnet_mc``: a WordNet 3.0 noun definition -> which of four words it defines
    (chance 0.25).
  * ``megavlm_heldout_cloze``: two sentences of a held-out demo document -> which of four
    sentences comes next (the other three from other held-out documents; chance 0.25).

Vision (embeddings from the demo's held-out caption store, the same EfficientNet-Lite0 encoding):
  * ``fashion_vqa``: Fashion-MNIST test images, "What is shown in the image?", scored with VQA
    normalization against the class name and its accepted synonyms (free-form: chance 0).
  * ``offline_pope``: balanced yes/no "Is there a <label> in the image?" over held-out Fashion-MNIST
    and Tux Paint images; negatives drawn uniformly (split ``random``) and from the most frequent
    labels (split ``popular``); scored by P("Yes") vs P("No") (chance 0.5).
  * ``tuxpaint_caption_ppl``: perplexity of held-out Tux Paint captions given their image
    (a metric, not an accuracy: reported, not part of the stable score).

Everything is deterministic (fixed seeds) and written to a folder of the caller's choosing.

They are the demo's (its assets, its corpus layout), so they live in the demo package; evaluation
runs them as a :class:`megavlm.eval.api.Suite` handed to ``megavlm.eval.api.evaluate``
(:class:`OfflineSuite`), so megavlm.eval never imports the demo. Running lm-eval tasks in general
is megavlm.eval.text's.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from megavlm.config import DataConfig
from megavlm.demo.debian import default_cache
from megavlm.eval.runner import CheckpointModel, EvalError, ScoreRequest
from megavlm.eval.text import run_text, text_accuracies
from megavlm.eval.vision import ImageBank, TaskResult, VisionQuestion, check_store, score_task

TEXT_SUITE = ("megavlm_wordnet_mc", "megavlm_heldout_cloze")
VISION_SUITE = ("fashion_vqa", "offline_pope", "tuxpaint_caption_ppl")

FASHION_SYNONYMS: dict[str, tuple[str, ...]] = {
    "t-shirt": ("t-shirt", "t shirt", "tshirt", "tee", "tee shirt", "top", "t-shirt/top"),
    "trouser": ("trouser", "trousers", "pants", "jeans", "slacks"),
    "pullover": ("pullover", "sweater", "jumper", "sweatshirt"),
    "dress": ("dress", "gown", "frock"),
    "coat": ("coat", "jacket", "overcoat"),
    "sandal": ("sandal", "sandals"),
    "shirt": ("shirt", "blouse", "button-down shirt"),
    "sneaker": ("sneaker", "sneakers", "trainer", "trainers", "gym shoe", "running shoe", "shoe"),
    "bag": ("bag", "handbag", "purse", "tote", "tote bag"),
    "ankle boot": ("ankle boot", "boot", "boots", "ankle boots"),
}
_FASHION_CAPTION = re.compile(r"^A photo of an? ([^:]+):")


# -- sources ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sources:
    """Where the suites read their assets: the demo corpus root and the WordNet data folder."""

    demo_root: Path
    wordnet: Optional[Path] = None

    @classmethod
    def default(cls, demo_root: Optional[str | Path] = None, wordnet: Optional[str | Path] = None) -> "Sources":
        """The demo corpus root (default: DataConfig.root) and WordNet as the demo build extracted
        it (``<cache>/extract/wordnet-base``) unless given."""
        root = Path(demo_root or DataConfig.root).expanduser()
        wn = Path(wordnet) if wordnet else default_cache() / "extract" / "wordnet-base" / "usr/share/wordnet"
        return cls(root, wn if wn.is_dir() else None)

    NEEDED = ("raw/text_heldout.jsonl", "captions_heldout.embeds", "raw/captions_heldout.jsonl")
    """What the suites read from the demo corpus root."""

    def missing(self) -> Optional[str]:
        """Why the suites cannot run here (the first absent asset), None when they can."""
        for rel in self.NEEDED:
            try:
                self.need(rel)
            except EvalError as e:
                return str(e)
        return None

    def need(self, rel: str) -> Path:
        p = self.demo_root / rel
        if not p.exists() and not Path(f"{p}.json").exists():  # a file, or a store prefix
            raise EvalError(f"offline suite needs {p}: build the demo corpus first "
                            f"(megavlm prepare demo --root {self.demo_root})")
        return p


# -- text suite ---------------------------------------------------------------------------------


def wordnet_definitions(wordnet: Path) -> list[tuple[str, str]]:
    """(word, definition) for single-word WordNet nouns whose definition does not contain the word."""
    data = wordnet / "data.noun"
    if not data.is_file():
        raise EvalError(f"WordNet noun data not found: {data} (Debian package wordnet-base)")
    out, seen = [], set()
    with open(data, encoding="latin-1") as f:
        for line in f:
            if line.startswith("  ") or " | " not in line:
                continue
            head, gloss = line.split(" | ", 1)
            word = head.split()[4].lower()
            definition = gloss.split('; "')[0].strip().rstrip(";").strip()
            if (not word.isalpha() or len(word) < 3 or word in seen or len(definition) < 10
                    or word in definition.lower()):
                continue
            seen.add(word)
            out.append((word, definition))
    return out


def build_wordnet_mc(wordnet: Path, n: int = 200, seed: int = 0) -> list[dict]:
    pairs = wordnet_definitions(wordnet)
    rng = np.random.default_rng(seed)
    docs = []
    for i in rng.choice(len(pairs), size=min(n, len(pairs)), replace=False):
        word, definition = pairs[int(i)]
        others = set()
        while len(others) < 3:
            w = pairs[int(rng.integers(len(pairs)))][0]
            if w != word:
                others.add(w)
        choices = sorted(others | {word})
        rng.shuffle(choices)
        docs.append({"definition": definition, "choices": [f" {c}" for c in choices],
                     "label": choices.index(word)})
    return docs


_SENTENCE = re.compile(r"(?<=[.!?;])\s+(?=[A-Z“\"‘'])")


def build_heldout_cloze(text_jsonl: Path, n: int = 200, seed: int = 0) -> list[dict]:
    docs = [json.loads(l)["text"] for l in text_jsonl.read_text().splitlines() if l.strip()]
    sents = [[s.strip() for s in _SENTENCE.split(d) if 20 <= len(s.strip()) <= 200] for d in docs]
    rng = np.random.default_rng(seed)
    cands = [(d, k) for d, ss in enumerate(sents) for k in range(2, len(ss))]
    if len(cands) < 4 or sum(1 for s in sents if s) < 2:
        raise EvalError(f"{text_jsonl}: too few held-out sentences for a cloze task")
    out = []
    for c in rng.choice(len(cands), size=min(n, len(cands)), replace=False):
        d, k = cands[int(c)]
        truth = sents[d][k]
        wrong: list[str] = []
        while len(wrong) < 3:
            o = int(rng.integers(len(sents)))
            if o != d and sents[o]:
                s = sents[o][int(rng.integers(len(sents[o])))]
                if s not in wrong and s != truth:
                    wrong.append(s)
        choices = wrong + [truth]
        rng.shuffle(choices)
        out.append({"context": " ".join(sents[d][k - 2:k]), "choices": [f" {s}" for s in choices],
                    "label": choices.index(truth)})
    return out


_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{text}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_text_suite(out_dir: str | Path, sources: Sources, n: int = 200) -> Path:
    """Write the offline text tasks (YAML + JSONL) under ``out_dir``; returns the include path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if sources.wordnet is None:
        raise EvalError("offline text suite needs WordNet (Debian package wordnet-base); build the "
                        "demo corpus first (megavlm prepare demo)")
    tasks = {
        "megavlm_wordnet_mc": (build_wordnet_mc(sources.wordnet, n),
                               "Definition: {{definition}}\\nWord:"),
        "megavlm_heldout_cloze": (build_heldout_cloze(sources.need("raw/text_heldout.jsonl"), n),
                                  "{{context}}"),
    }
    for task, (docs, text) in tasks.items():
        data = out / f"{task}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        (out / f"{task}.yaml").write_text(_YAML.format(task=task, data=data.resolve(), text=text))
    return out


# -- vision suite -------------------------------------------------------------------------------


def _heldout_images(sources: Sources) -> tuple[ImageBank, list[tuple[str, str, str]]]:
    """The held-out caption store and its (image key, caption, label) records."""
    bank = ImageBank(sources.need("captions_heldout.embeds"))
    recs = []
    for line in sources.need("raw/captions_heldout.jsonl").read_text().splitlines():
        r = json.loads(line)
        m = _FASHION_CAPTION.match(r["caption"])
        if "fashion-test" in Path(r["image"]).name and m:
            label = m.group(1).strip().lower()
        else:
            words = r["caption"].strip().rstrip(".!").split()
            if words and words[0].lower() in ("a", "an", "the", "some"):
                words = words[1:]
            label = " ".join(words).lower() if 0 < len(words) <= 3 else ""
        recs.append((r["image"], r["caption"], label))
    return bank, recs


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def build_fashion_vqa(recs: Sequence[tuple[str, str, str]], n: Optional[int] = None) -> list[VisionQuestion]:
    out = []
    for k, (image, _, label) in enumerate(recs):
        if "fashion-test" in Path(image).name and label in FASHION_SYNONYMS:
            out.append(VisionQuestion(f"fashion-{k}", image, "What is shown in the image?",
                                      FASHION_SYNONYMS[label]))
    return out[:n] if n else out


def build_offline_pope(recs: Sequence[tuple[str, str, str]], n: Optional[int] = None,
                       seed: int = 0) -> list[VisionQuestion]:
    """Balanced yes/no presence questions; each image asked once per split, yes and no alternating."""
    labelled = [(i, lab) for i, _, lab in recs if lab]
    labels = sorted({lab for _, lab in labelled})
    if len(labels) < 2:
        raise EvalError("offline POPE needs images with at least two different labels")
    counts: dict[str, int] = {}
    for _, lab in labelled:
        counts[lab] = counts.get(lab, 0) + 1
    popular = sorted(labels, key=lambda l: (-counts[l], l))[:10]
    rng = np.random.default_rng(seed)
    out = []
    for split, pool in (("random", labels), ("popular", popular)):
        for k, (image, label) in enumerate(labelled[:n] if n else labelled):
            present = k % 2 == 0
            obj = label
            if not present:
                choices = [l for l in pool if l != label]
                obj = choices[int(rng.integers(len(choices)))]
            out.append(VisionQuestion(f"pope-{split}-{k}", image,
                                      f"Is there {_article(obj)} {obj} in the image?",
                                      ("yes" if present else "no",), label=present, split=split))
    return out


def caption_perplexity(model: CheckpointModel, bank: ImageBank, recs: Sequence[tuple[str, str, str]],
                       n: Optional[int] = None) -> TaskResult:
    """exp(mean NLL per caption token + EOD) of held-out Tux Paint captions after their image."""
    rows = [(image, cap) for image, cap, _ in recs if "fashion-" not in Path(image).name]
    rows = rows[:n] if n else rows
    if not rows:
        raise EvalError(f"{bank.prefix}: no held-out Tux Paint captions")
    qs = [VisionQuestion(str(k), image, cap) for k, (image, cap) in enumerate(rows)]
    records = bank.resolve(qs, bank.prefix)
    t0 = time.perf_counter()
    scores = model.score([ScoreRequest([], model.encode(cap) + [model.tok.eod], bank.tensor(i))
                          for (_, cap), i in zip(rows, records)])
    seconds = time.perf_counter() - t0
    nll = -sum(s.logprob for s in scores) / sum(s.tokens for s in scores)
    return TaskResult("tuxpaint_caption_ppl", None, len(rows),
                      {"perplexity": math.exp(nll), "nll_per_token": nll,
                       "questions_per_s": len(rows) / seconds}, seconds)


def run_vision_suite(model: CheckpointModel, sources: Sources, limit: Optional[int] = None,
                     max_new_tokens: int = 128, shards=None, *, template: str) -> list[TaskResult]:
    """The offline vision suite, questions asked as ``template`` (the checkpoint's training
    template; the referring prompt is fixed); with ``shards`` (megavlm.eval.distributed) the question
    tasks are split across the data-parallel ranks (the caption perplexity, a few hundred rows, is not)."""
    bank, recs = _heldout_images(sources)
    check_store(bank.store, model)
    src = sources.demo_root / "raw/captions_heldout.jsonl"
    fashion = build_fashion_vqa(recs, limit)
    if not fashion:
        raise EvalError(f"{src}: no Fashion-MNIST test images in the held-out captions")
    results = [score_task("synonyms", model, fashion, bank, src, max_new_tokens, name="fashion_vqa", shards=shards,
                          template=template),
               score_task("pope", model, build_offline_pope(recs, limit), bank, src, name="offline_pope",
                          shards=shards, template=template)]
    results.append(caption_perplexity(model, bank, recs, limit))
    return results



@dataclass(frozen=True)
class OfflineSuite:
    """The offline suites as one :class:`megavlm.eval.api.Suite`: what ``megavlm eval all``, the
    demo and the sweep score a checkpoint with when no lm-eval tasks are named."""

    sources: Sources
    text_tasks: tuple[str, ...] = TEXT_SUITE

    @classmethod
    def default(cls, demo_root: Optional[str | Path] = None, wordnet: Optional[str | Path] = None) -> "OfflineSuite":
        return cls(Sources.default(demo_root, wordnet))

    def missing(self) -> Optional[str]:
        """Why the suites' demo assets are absent (megavlm.eval.api.Suite's optional ``missing``)."""
        return self.sources.missing()

    def text(self, model: CheckpointModel, workdir: Path, limit: Optional[float] = None) -> tuple[dict, dict]:
        """lm-eval's results dict and the per-task accuracies of the text suite (written into ``workdir``)."""
        include = write_text_suite(workdir, self.sources)
        res = run_text(model, list(self.text_tasks), include, limit, include_defaults=False)
        return res, text_accuracies(res)

    def vision(self, model: CheckpointModel, *, template: str, limit: Optional[int] = None,
               max_new_tokens: int = 128, shards=None) -> list[TaskResult]:
        return run_vision_suite(model, self.sources, limit, max_new_tokens, shards, template=template)
