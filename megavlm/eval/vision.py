"""Vision tasks on stored image embeddings: question readers, image lookup, generation and scoring.

The model never sees pixels, at evaluation either: a task's images are encoded once by the data
pipeline's tool (``tools/encode_images.py --no-captions``) into an embedding store whose record
keys are the image paths, and questions refer to images by path or id. Before any forward pass
every question's image is looked up and the store is checked against the checkpoint (width,
patches, encoder), so a wrong file fails at once with its name instead of producing a score.

Prompting follows the instruction-tuning layout of megavlm.prep.conversations —
``[image][SEP][USER] \\n{question}\\nAnswer the question using a single word or phrase. [SEP][ASSISTANT]``
— and the answer is greedy (at most 128 new tokens, stopped at SEP/EOD). POPE compares
log P("Yes") with log P("No") after the same prompt.

Readers (the layouts the benchmarks ship in): VQAv2 questions + annotations JSON, GQA's
``{qid: {imageId, question, answer}}``, TextVQA's ``{"data": [...]}``, POPE JSONL
(``{question_id, image, text, label}``), referring expressions as JSON/JSONL records
``{image, expression|sentence, bbox: [x1, y1, x2, y2] normalized}``, and a generic JSONL
``{question_id, image, question, answers}``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from megavlm.data.indexed import DataError, EmbeddingStore
from megavlm.eval import scorers
from megavlm.eval.runner import CheckpointModel, EvalError, ScoreRequest

PROMPT = "\n{question}\nAnswer the question using a single word or phrase."
MAX_NEW_TOKENS = 128


@dataclass(frozen=True)
class VisionQuestion:
    """One question about one image; which answer fields are set depends on the task."""

    qid: str
    image: str
    question: str
    answers: tuple[str, ...] = ()
    label: Optional[bool] = None
    box: Optional[tuple[float, float, float, float]] = None
    split: str = ""


# -- readers ------------------------------------------------------------------------------------


def _load_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"question file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix == ".jsonl":
            return [json.loads(l) for l in text.splitlines() if l.strip()]
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise EvalError(f"{path}: not valid JSON ({e})") from None


def _need(rec: dict, keys: Sequence[str], where: str) -> Any:
    for k in keys:
        if k in rec:
            return rec[k]
    raise EvalError(f"{where}: record has none of the fields {list(keys)}")


def read_vqav2(questions: str | Path, annotations: Optional[str | Path] = None) -> list[VisionQuestion]:
    """VQAv2 (``{"questions": [{image_id, question, question_id}]}`` + ``{"annotations":
    [{question_id, answers: [{answer}]}]}``). Without annotations, answers are empty (predict only)."""
    qs = _load_json(questions)
    if not isinstance(qs, dict) or "questions" not in qs:
        raise EvalError(f"{questions}: not a VQAv2 question file (no 'questions' list)")
    answers: dict = {}
    if annotations is not None:
        ann = _load_json(annotations)
        if not isinstance(ann, dict) or "annotations" not in ann:
            raise EvalError(f"{annotations}: not a VQAv2 annotation file (no 'annotations' list)")
        answers = {a["question_id"]: tuple(x["answer"] for x in a["answers"]) for a in ann["annotations"]}
    out = []
    for q in qs["questions"]:
        qid = q["question_id"]
        if annotations is not None and qid not in answers:
            raise EvalError(f"{annotations}: no answers for question {qid}")
        out.append(VisionQuestion(str(qid), str(q["image_id"]), q["question"], answers.get(qid, ())))
    return out


def read_gqa(path: str | Path) -> list[VisionQuestion]:
    """GQA balanced questions: ``{qid: {imageId, question, answer}}``."""
    d = _load_json(path)
    if not isinstance(d, dict):
        raise EvalError(f"{path}: not a GQA question file (expected an object keyed by question id)")
    return [VisionQuestion(str(k), str(v["imageId"]), v["question"], (v["answer"],) if "answer" in v else ())
            for k, v in d.items()]


def read_textvqa(path: str | Path) -> list[VisionQuestion]:
    """TextVQA: ``{"data": [{question_id, image_id, question, answers}]}``."""
    d = _load_json(path)
    if not isinstance(d, dict) or "data" not in d:
        raise EvalError(f"{path}: not a TextVQA file (no 'data' list)")
    return [VisionQuestion(str(r["question_id"]), str(r["image_id"]), r["question"],
                           tuple(r.get("answers", ()))) for r in d["data"]]


def read_pope(path: str | Path, split: str = "") -> list[VisionQuestion]:
    """POPE JSONL: ``{question_id, image, text, label: yes|no}``; the split defaults to the file
    name's ``adversarial``/``popular``/``random``."""
    recs = _load_json(path)
    if isinstance(recs, dict):
        recs = [recs]
    split = split or next((s for s in scorers.POPE_SPLITS if s in Path(path).name), "")
    out = []
    for i, r in enumerate(recs):
        where = f"{path}: record {i}"
        label = str(_need(r, ("label", "answer"), where)).strip().lower()
        if label not in ("yes", "no"):
            raise EvalError(f"{where}: label {label!r} is not yes/no")
        out.append(VisionQuestion(str(r.get("question_id", i)), str(_need(r, ("image",), where)),
                                  str(_need(r, ("text", "question"), where)), (label,),
                                  label=label == "yes", split=r.get("split", split)))
    return out


def read_refer(path: str | Path) -> list[VisionQuestion]:
    """Referring expressions (RefCOCO/OCID-Ref prepared as records with a normalized bbox)."""
    recs = _load_json(path)
    out = []
    for i, r in enumerate(recs):
        where = f"{path}: record {i}"
        box = tuple(float(v) for v in _need(r, ("bbox", "box"), where))
        if len(box) != 4:
            raise EvalError(f"{where}: bbox must be [x1, y1, x2, y2]")
        expr = str(_need(r, ("expression", "sentence", "question"), where))
        out.append(VisionQuestion(str(r.get("question_id", i)), str(_need(r, ("image", "image_id"), where)),
                                  expr, box=box))  # type: ignore[arg-type]
    return out


def read_generic(path: str | Path) -> list[VisionQuestion]:
    """JSON list / JSONL of ``{question_id, image, question, answers}``."""
    recs = _load_json(path)
    out = []
    for i, r in enumerate(recs):
        where = f"{path}: record {i}"
        ans = r.get("answers", r.get("answer", ()))
        ans = (ans,) if isinstance(ans, str) else tuple(a["answer"] if isinstance(a, dict) else a for a in ans)
        out.append(VisionQuestion(str(r.get("question_id", i)), str(_need(r, ("image", "image_id"), where)),
                                  str(_need(r, ("question", "text"), where)), ans))
    return out


READERS: dict[str, Callable[..., list[VisionQuestion]]] = {
    "vqav2": read_vqav2, "gqa": read_gqa, "textvqa": read_textvqa, "pope": read_pope,
    "refcoco": read_refer, "ocid_ref": read_refer, "generic": read_generic,
}


# -- images -------------------------------------------------------------------------------------


def check_store(store: EmbeddingStore, model: CheckpointModel) -> None:
    """The store must come from the encoder the checkpoint's projector was trained on: same
    width and patch count as its config, and — when the run's training caption store is still
    reachable — the same encoder name and image size."""
    v = model.run.model.vision
    m = store.meta
    where = f"embedding store {store.prefix} (encoder {m.encoder}, {m.num_patches}x{m.embed_dim})"
    if m.embed_dim != v.embed_dim or m.num_patches != v.num_patches:
        raise EvalError(f"{where} does not fit checkpoint {model.path}: its projector expects "
                        f"{v.num_patches} patches of width {v.embed_dim}")
    trained = training_encoder(model.run)
    if trained is not None:
        for key in ("encoder", "image_size"):
            if trained.get(key) is not None and trained[key] != getattr(m, key):
                raise EvalError(f"{where} was made with {key}={getattr(m, key)!r}, but checkpoint "
                                f"{model.path} was trained on {key}={trained[key]!r} embeddings")


def training_encoder(run) -> Optional[dict]:
    """Metadata of the run's first training caption store, if that file is still there."""
    for prefix in run.data.captions:
        meta = Path(f"{run.data.resolve(prefix)}.embeds.json")
        if meta.is_file():
            try:
                return json.loads(meta.read_text())
            except json.JSONDecodeError:
                return None
    return None


class ImageBank:
    """An embedding store indexed by image reference: full key, file name, stem, or the number
    in it (so COCO-style ``image_id``s find ``COCO_val2014_000000123456.jpg``)."""

    def __init__(self, prefix: str | Path):
        try:
            self.store = EmbeddingStore(prefix)
        except DataError as e:
            raise EvalError(str(e)) from None
        self.prefix = Path(prefix)
        self._index: dict[str, int] = {}
        for i, key in enumerate(self.store.meta.keys or []):
            p = Path(key)
            for k in (key, p.name, p.stem, *re.findall(r"\d+", p.stem)[-1:]):
                self._index.setdefault(k, i)
            digits = re.findall(r"\d+", p.stem)
            if digits:
                self._index.setdefault(str(int(digits[-1])), i)

    def lookup(self, ref: str) -> Optional[int]:
        p = Path(ref)
        for k in (ref, p.name, p.stem):
            if k in self._index:
                return self._index[k]
        return self._index[str(int(ref))] if ref.isdigit() and str(int(ref)) in self._index else None

    def resolve(self, questions: Sequence[VisionQuestion], source: str | Path) -> list[int]:
        """Store record of every question's image; the first missing one is an error."""
        out = []
        for q in questions:
            i = self.lookup(q.image)
            if i is None:
                raise EvalError(f"{source}: question {q.qid} references image {q.image!r}, which is not "
                                f"in embedding store {self.prefix} ({len(self.store)} images); encode it "
                                f"with tools/encode_images.py")
            out.append(i)
        return out

    def tensor(self, i: int) -> torch.Tensor:
        return self.store.get_tensor(i)


# -- running ------------------------------------------------------------------------------------


def prompt_ids(model: CheckpointModel, question: str, template: str = PROMPT) -> list[int]:
    """The text after the image: user turn with the question, then the assistant marker."""
    sp = model.tok.special
    return [sp.user] + model.encode(template.format(question=question)) + [sp.sep, sp.assistant]


def generate_answers(model: CheckpointModel, questions: Sequence[VisionQuestion], bank: ImageBank,
                     records: Sequence[int], max_new_tokens: int = MAX_NEW_TOKENS,
                     template: str = PROMPT) -> list[str]:
    """Greedy answers, batched by the model's batch size."""
    prompts = [prompt_ids(model, q.question, template) for q in questions]
    images = [bank.tensor(i) for i in records]
    return [a.strip() for a in model.generate(prompts, images, max_new_tokens=max_new_tokens,
                                              stop_ids=(model.tok.sep, model.tok.eod))]


def yes_no_logprobs(model: CheckpointModel, questions: Sequence[VisionQuestion], bank: ImageBank,
                    records: Sequence[int], template: str = PROMPT) -> list[tuple[float, float]]:
    """(log P("Yes"), log P("No")) after each question's prompt, both in one batched scoring pass."""
    yes, no = model.encode("Yes"), model.encode("No")
    reqs = []
    for q, i in zip(questions, records):
        ctx, img = prompt_ids(model, q.question, template), bank.tensor(i)
        reqs += [ScoreRequest(ctx, yes, img), ScoreRequest(ctx, no, img)]
    s = model.score(reqs)
    return [(s[2 * k].logprob, s[2 * k + 1].logprob) for k in range(len(questions))]


@dataclass
class TaskResult:
    """One vision task's outcome: ``accuracy`` enters the stable score, ``metrics`` are extra."""

    task: str
    accuracy: Optional[float]
    n: int
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0
    predictions: list = field(default_factory=list)


def score_task(task: str, model: CheckpointModel, questions: Sequence[VisionQuestion], bank: ImageBank,
               source: str | Path, max_new_tokens: int = MAX_NEW_TOKENS, name: str = "") -> TaskResult:
    """Run and score one task: ``task`` names the scoring rule (a key of READERS, or ``synonyms``:
    correct when the answer is any accepted answer), ``name`` the result (default: ``task``)."""
    import time

    if not questions:
        raise EvalError(f"{source}: no questions")
    check_store(bank.store, model)
    records = bank.resolve(questions, source)
    t0 = time.perf_counter()
    metrics: dict = {}
    if task == "pope":
        lps = yes_no_logprobs(model, questions, bank, records)
        preds = [scorers.pope_prediction(y, n) for y, n in lps]
        splits: dict[str, list[int]] = {}
        for k, q in enumerate(questions):
            if q.label is None:
                raise EvalError(f"{source}: POPE question {q.qid} has no yes/no label")
            splits.setdefault(q.split or "all", []).append(k)
        per = {s: scorers.pope_accuracy([preds[k] for k in ks], [questions[k].label for k in ks])
               for s, ks in splits.items()}
        metrics["per_split"] = per
        acc = scorers.pope_score(per)
        out = ["yes" if p else "no" for p in preds]
    else:
        out = generate_answers(model, questions, bank, records, max_new_tokens)
        if task in ("refcoco", "ocid_ref"):
            thr = scorers.REFCOCO_IOU if task == "refcoco" else scorers.OCIDREF_IOU
            accs = [scorers.box_accuracy(a, q.box, thr) for a, q in zip(out, questions)]
        else:
            rule = {"vqav2": scorers.vqa_accuracy, "textvqa": scorers.textvqa_accuracy,
                    "gqa": lambda p, a: scorers.gqa_accuracy(p, a[0]),
                    "generic": scorers.vqa_accuracy, "synonyms": scorers.synonym_accuracy}.get(task)
            if rule is None:
                raise EvalError(f"unknown vision task {task!r}; known: {sorted(READERS)}")
            if any(not q.answers for q in questions):
                raise EvalError(f"{source}: questions without answers cannot be scored (task {task})")
            accs = [rule(a, q.answers) for a, q in zip(out, questions)]
        acc = sum(accs) / len(accs)
    seconds = time.perf_counter() - t0
    metrics["questions_per_s"] = len(questions) / seconds if seconds > 0 else math.inf
    return TaskResult(name or task, acc, len(questions), metrics, seconds,
                      [{"qid": q.qid, "prediction": p} for q, p in zip(questions, out)])
