"""The paper's vision suite from the files the benchmarks publish: ``megavlm eval vision --suite paper``.

Expected layout under ``--data-root DIR`` (the files as downloaded; image folders as shipped):

  DIR/vqav2/v2_OpenEnded_mscoco_val2014_questions.json
  DIR/vqav2/v2_mscoco_val2014_annotations.json
  DIR/vqav2/val2014/COCO_val2014_%012d.jpg
  DIR/gqa/testdev_balanced_questions.json        DIR/gqa/images/{imageId}.jpg
  DIR/textvqa/TextVQA_0.5.1_val.json             DIR/textvqa/train_images/{image_id}.jpg
  DIR/pope/coco_pope_{adversarial,popular,random}.json   DIR/pope/val2014/COCO_val2014_*.jpg
  DIR/refcoco/refcoco/refs(unc).p + instances.json       (RefCOCO)
  DIR/refcoco/refcoco+/refs(unc).p + instances.json      (RefCOCO+)
  DIR/refcoco/refcocog/refs(umd).p (or refs(google).p) + instances.json   (RefCOCOg)
  DIR/refcoco/train2014/COCO_train2014_%012d.jpg         (shared by the three)
  DIR/ocid-ref/val_expressions.json              DIR/ocid-ref/OCID-dataset/<scene_path>

Tasks (result names = stable-score table keys): vqav2, gqa, textvqa, textvqa_ocr (the question
followed by ``Reference OCR token: a, b, …``), pope, refcoco, refcoco+, refcocog, ocid_ref. A
task whose question files are absent is listed and skipped (``--strict``: an error); a task
whose images are missing is an error that counts them. Images are encoded once per folder with
the checkpoint's encoder into ``DIR/.megavlm-cache`` (megavlm.eval.images).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from megavlm.eval import formats
from megavlm.eval.images import cached_bank, load_encoder
from megavlm.eval.questions import VisionQuestion
from megavlm.eval.runner import CheckpointModel, EvalError
from megavlm.eval.vision import TaskResult, score_task

OCR_LINE = "\nReference OCR token: {tokens}"
"""TextVQA with OCR tokens: the question, a newline, ``Reference OCR token: tok1, tok2, …`` — the
prompt of LLaVA-1.5's ``llava_textvqa_val_v051_ocr.jsonl`` that Prismatic/vlm-evaluation reports
(lmms-eval's textvqa ``ocr: true`` builds the same ``\\nReference OCR token: {', '.join(ocr_tokens)}``)."""


@dataclass(frozen=True)
class PaperTask:
    """One task of the suite: where its files are, how to read them, how to score them."""

    name: str
    rule: str
    """Scoring rule of megavlm.eval.vision.score_task."""
    files: tuple[tuple[str, ...], ...]
    """Question files relative to the data root; each entry lists alternatives (first present wins)."""
    images: str
    """Image folder relative to the data root; questions name images relative to it."""
    read: Callable[[list[Path]], list[VisionQuestion]]


def _vqav2(files: list[Path]) -> list[VisionQuestion]:
    return formats.read_vqav2(files[0], files[1])


def _textvqa_ocr(files: list[Path]) -> list[VisionQuestion]:
    return [dataclasses.replace(q, question=q.question + OCR_LINE.format(tokens=", ".join(q.ocr)))
            if q.ocr else q for q in formats.read_textvqa(files[0])]


def _pope(files: list[Path]) -> list[VisionQuestion]:
    return [q for f in files for q in formats.read_pope(f)]


def _refcoco(files: list[Path]) -> list[VisionQuestion]:
    return formats.read_refcoco(files[0], files[1], splits=("val",))


def _ref_files(sub: str, by: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    return (tuple(f"refcoco/{sub}/refs({b}).p" for b in by), (f"refcoco/{sub}/instances.json",))


PAPER_TASKS: tuple[PaperTask, ...] = (
    PaperTask("vqav2", "vqav2", (("vqav2/v2_OpenEnded_mscoco_val2014_questions.json",),
                                 ("vqav2/v2_mscoco_val2014_annotations.json",)), "vqav2/val2014", _vqav2),
    PaperTask("gqa", "gqa", (("gqa/testdev_balanced_questions.json",),), "gqa/images",
              lambda f: formats.read_gqa(f[0])),
    PaperTask("textvqa", "textvqa", (("textvqa/TextVQA_0.5.1_val.json",),), "textvqa",
              lambda f: formats.read_textvqa(f[0])),
    PaperTask("textvqa_ocr", "textvqa", (("textvqa/TextVQA_0.5.1_val.json",),), "textvqa", _textvqa_ocr),
    PaperTask("pope", "pope", tuple((f"pope/coco_pope_{s}.json",) for s in ("adversarial", "popular", "random")),
              "pope/val2014", _pope),
    PaperTask("refcoco", "refcoco", _ref_files("refcoco", ("unc",)), "refcoco/train2014", _refcoco),
    PaperTask("refcoco+", "refcoco", _ref_files("refcoco+", ("unc",)), "refcoco/train2014", _refcoco),
    PaperTask("refcocog", "refcoco", _ref_files("refcocog", ("umd", "google")), "refcoco/train2014", _refcoco),
    PaperTask("ocid_ref", "ocid_ref", (("ocid-ref/val_expressions.json",),), "ocid-ref/OCID-dataset",
              lambda f: formats.read_ocid_ref(f[0])),
)
TASK_NAMES = tuple(t.name for t in PAPER_TASKS)


@dataclass
class Found:
    task: PaperTask
    files: list[Path]
    questions: list[VisionQuestion]


def discover(data_root: str | Path, tasks: Optional[Sequence[str]] = None, strict: bool = False,
             limit: Optional[int] = None) -> tuple[list[Found], list[str]]:
    """The suite's tasks present under ``data_root`` (read, images checked) and the names of the
    absent ones with what each lacks. ``limit``: the first N questions of each task."""
    root = Path(data_root)
    if not root.is_dir():
        raise EvalError(f"data root not found: {root}")
    wanted = list(tasks) if tasks else list(TASK_NAMES)
    unknown = [t for t in wanted if t not in TASK_NAMES]
    if unknown:
        raise EvalError(f"unknown paper-suite task(s) {unknown}; known: {list(TASK_NAMES)}")
    found, absent = [], []
    for t in (t for t in PAPER_TASKS if t.name in wanted):
        files, lacking = [], []
        for alts in t.files:
            hit = next((root / a for a in alts if (root / a).is_file()), None)
            if hit is None:
                lacking.append(" or ".join(str(root / a) for a in alts))
            else:
                files.append(hit)
        if lacking:
            absent.append(f"{t.name} (no {'; no '.join(lacking)})")
            continue
        qs = t.read(files)
        if limit:
            qs = qs[:limit] if t.rule != "pope" else _per_split(qs, limit)
        if not qs:
            raise EvalError(f"{files[0]}: no questions for task {t.name}")
        formats.check_images(qs, root / t.images, files[0])
        found.append(Found(t, files, qs))
    if absent and strict:
        raise EvalError(f"--strict: paper-suite task(s) missing under {root}: {'; '.join(absent)}")
    return found, absent


def _per_split(qs: list[VisionQuestion], n: int) -> list[VisionQuestion]:
    counts: dict[str, int] = {}
    out = []
    for q in qs:
        if counts.get(q.split, 0) < n:
            counts[q.split] = counts.get(q.split, 0) + 1
            out.append(q)
    return out


def run_paper_suite(model: CheckpointModel, data_root: str | Path, tasks: Optional[Sequence[str]] = None,
                    limit: Optional[int] = None, max_new_tokens: int = 128, strict: bool = False,
                    shards=None, progress: bool = False, *, template: str) -> tuple[list[TaskResult], list[str]]:
    """Score every present task, questions asked as ``template``; returns the results and the
    skipped tasks. Images are encoded
    by rank 0 into the cache (the other ranks wait for it), then every rank reads the cache."""
    root = Path(data_root)
    enc = load_encoder(model)  # a checkpoint without an encoder record fails before any file is read
    found, absent = discover(root, tasks, strict, limit)
    if not found:
        raise EvalError(f"no paper-suite task found under {root}: {'; '.join(absent)}")
    folders: dict[str, set[str]] = {}
    for f in found:
        folders.setdefault(f.task.images, set()).update(q.image for q in f.questions)
    if shards is None or shards.is_main:
        for folder, keys in folders.items():
            cached_bank(root, root / folder, keys, enc, progress)
    if shards is not None:
        shards.barrier()
    banks = {folder: cached_bank(root, root / folder, keys, enc) for folder, keys in folders.items()}
    results = [score_task(f.task.rule, model, f.questions, banks[f.task.images], f.files[0], max_new_tokens,
                          name=f.task.name, shards=shards, template=template) for f in found]
    return results, absent
