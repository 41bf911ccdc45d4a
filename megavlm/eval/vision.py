"""Vision tasks on stored image embeddings: image lookup, generation and scoring.

The model never sees pixels, at evaluation either: a task's images are encoded once (by
``tools/encode_images.py --no-captions``, or by ``megavlm eval vision --suite paper``, which
caches them under the data root) into an embedding store whose record keys are the image paths,
and questions refer to images by path or id. Before any forward pass every question's image is
looked up and the store is checked against the checkpoint (width, patches, encoder), so a wrong
file fails at once with its name instead of producing a score.

Prompting follows the instruction-tuning layout of megavlm.prep.conversations —
``[image][SEP][USER] \\n{question}\\nAnswer the question using a single word or phrase. [SEP][ASSISTANT]``
— and the answer is greedy (at most 128 new tokens, stopped at SEP/EOD). POPE compares
log P("Yes") with log P("No") after the same prompt. Referring expressions ask for the box with
LLaVA-1.5's referring prompt (REFER_PROMPT), whose answer is ``[x1, y1, x2, y2]``.

Every task produces one result row per question (prediction, score, split); the task's numbers
are computed from the rows. Under data parallelism (megavlm.eval.distributed) each rank answers
its shard of the questions and the rows are gathered before scoring, so the scores are those of
one process.

The question readers live in megavlm.eval.formats; the names below are re-exported from there.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import torch

from megavlm.data.indexed import DataError, EmbeddingStore
from megavlm.eval import scorers
from megavlm.eval.formats import (READERS, read_generic, read_gqa, read_ocid_ref, read_pope,  # noqa: F401
                                  read_refcoco, read_refer, read_textvqa, read_vqav2)
from megavlm.eval.questions import VisionQuestion
from megavlm.eval.runner import CheckpointModel, EvalError, ScoreRequest
from megavlm.run_folder import EMBEDS_META

if TYPE_CHECKING:
    from megavlm.eval.distributed import EvalShards

from megavlm.config import DEFAULT_PROMPT_TEMPLATE as PROMPT  # noqa: E402  (the default; checkpoints record theirs)
REFER_PROMPT = "\nPlease provide the bounding box coordinate of the region this sentence describes: {question}"
"""LLaVA-1.5's referring-expression prompt (its instruction mix teaches the ``[x1, y1, x2, y2]``
answer with normalized coordinates, which vlm-evaluation's parse_bbox expects)."""
MAX_NEW_TOKENS = 128
BOX_TASKS = {"refcoco": scorers.REFCOCO_IOU, "ocid_ref": scorers.OCIDREF_IOU}
"""Scoring rules that compare a generated box with the reference (refcoco covers RefCOCO+/g too)."""


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
        meta = Path(f"{run.data.resolve(prefix)}{EMBEDS_META}")
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
    """The text after the image: user turn with the question, then the assistant marker, built by
    the function training formats human turns with (megavlm.data.prompt)."""
    from megavlm.data.prompt import question_prompt

    return question_prompt(model.tok, template, question)


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
    """One vision task's outcome: ``accuracy`` enters the stable score, ``metrics`` are extra;
    ``predictions`` holds one row per question (qid, prediction, score, and split when set)."""

    task: str
    accuracy: Optional[float]
    n: int
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0
    predictions: list = field(default_factory=list)


_RULES = {"vqav2": scorers.vqa_accuracy, "textvqa": scorers.textvqa_accuracy,
          "gqa": lambda p, a: scorers.gqa_accuracy(p, a[0]),
          "generic": scorers.vqa_accuracy, "synonyms": scorers.synonym_accuracy}
RULES = ("pope", *BOX_TASKS, *_RULES)
"""Scoring rules ``score_task`` knows."""


def answer_rows(task: str, model: CheckpointModel, questions: Sequence[VisionQuestion], bank: ImageBank,
                records: Sequence[int], max_new_tokens: int = MAX_NEW_TOKENS, *, template: str) -> list[dict]:
    """One row per question: ``{qid, prediction, score}`` (+ POPE's two log-probabilities).
    Questions are asked as ``template`` (``{question}`` in it; the checkpoint's training template,
    see megavlm.eval.api.resolve_prompt); box tasks use REFER_PROMPT."""
    asked = template
    if task == "pope":
        lps = yes_no_logprobs(model, questions, bank, records, asked)
        rows = []
        for q, (y, n) in zip(questions, lps):
            yes = scorers.pope_prediction(y, n)
            rows.append({"qid": q.qid, "prediction": "yes" if yes else "no", "score": float(yes == q.label),
                         "logp_yes": y, "logp_no": n})
        return rows
    template = REFER_PROMPT if task in BOX_TASKS else asked
    out = generate_answers(model, questions, bank, records, max_new_tokens, template)
    if task in BOX_TASKS:
        scores = [scorers.box_accuracy(a, q.box, BOX_TASKS[task]) for a, q in zip(out, questions)]
    else:
        scores = [_RULES[task](a, q.answers) for a, q in zip(out, questions)]
    return [{"qid": q.qid, "prediction": a, "score": float(sc)} for q, a, sc in zip(questions, out, scores)]


def aggregate(task: str, questions: Sequence[VisionQuestion], rows: Sequence[dict]) -> tuple[float, dict]:
    """The task's accuracy and extra metrics from its per-question rows. POPE: mean over splits of
    the per-split accuracy; the rest: mean score (with per-split means when questions carry splits)."""
    splits: dict[str, list[float]] = {}
    for q, r in zip(questions, rows):
        splits.setdefault(q.split or "all", []).append(r["score"])
    per = {s: sum(v) / len(v) for s, v in splits.items()}
    if task == "pope":
        return scorers.pope_score(per), {"per_split": per}
    acc = sum(r["score"] for r in rows) / len(rows)
    return acc, ({"per_split": per} if len(per) > 1 else {})


def _validate(task: str, questions: Sequence[VisionQuestion], source: str | Path) -> None:
    if task not in RULES:
        raise EvalError(f"unknown vision task {task!r}; known: {sorted(RULES)}")
    for q in questions:
        if task == "pope" and q.label is None:
            raise EvalError(f"{source}: POPE question {q.qid} has no yes/no label")
        if task in BOX_TASKS and q.box is None:
            raise EvalError(f"{source}: question {q.qid} has no reference box (task {task})")
        if task in _RULES and not q.answers:
            raise EvalError(f"{source}: questions without answers cannot be scored (task {task})")


def score_task(task: str, model: CheckpointModel, questions: Sequence[VisionQuestion], bank: ImageBank,
               source: str | Path, max_new_tokens: int = MAX_NEW_TOKENS, name: str = "",
               shards: Optional["EvalShards"] = None, *, template: str) -> TaskResult:
    """Run and score one task: ``task`` names the scoring rule (see RULES; ``synonyms``: correct
    when the answer is any accepted answer), ``name`` the result (default: ``task``), ``template``
    the question template (always explicit: a checkpoint is asked as it was trained). With
    ``shards`` this rank answers only its share of the questions and every rank returns the
    result of all of them."""
    if not questions:
        raise EvalError(f"{source}: no questions")
    _validate(task, questions, source)
    check_store(bank.store, model)
    records = bank.resolve(questions, source)
    t0 = time.perf_counter()
    if shards is None or shards.world == 1:
        rows = answer_rows(task, model, questions, bank, records, max_new_tokens, template=template)
    else:
        mine = shards.indices(len(questions))
        part = answer_rows(task, model, [questions[i] for i in mine], bank, [records[i] for i in mine],
                           max_new_tokens, template=template) if mine else []
        rows = shards.gather(mine, part, len(questions))
    acc, metrics = aggregate(task, questions, rows)
    seconds = time.perf_counter() - t0
    metrics["questions_per_s"] = len(questions) / seconds if seconds > 0 else math.inf
    if shards is not None and shards.world > 1:
        metrics["data_parallel_ranks"] = shards.world
    for q, r in zip(questions, rows):
        if q.split:
            r["split"] = q.split
    return TaskResult(name or task, acc, len(questions), metrics, seconds, list(rows))
