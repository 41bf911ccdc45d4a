"""The benchmarks' question files as their authors publish them, read into VisionQuestions.

``READERS`` maps a task's layout name to its reader; :func:`detect_layout` recognises a file by
its structure (so a file in an unknown layout is one error that names it and lists the known
layouts); :func:`check_images` reports the questions whose image file is missing from the data
root — how many, and the first few — before any image is encoded.

Layouts (see the reader modules for the exact fields):
  vqav2     VQAv2 questions {"questions": [...]} (+ annotations {"annotations": [...]})
  gqa       GQA {qid: {imageId, question, answer, ...}}
  textvqa   TextVQA {"data": [{question_id, question, image_id, answers, ocr_tokens}]}
  pope      POPE JSON lines {question_id, image, text, label}
  refcoco   REFER refs(unc|umd|google).p + instances.json (RefCOCO, RefCOCO+, RefCOCOg)
  ocid_ref  OCID-Ref {example_id: {scene_path, sentence, bbox, take_id}}
  refer     prepared records {image, expression, bbox: normalized [x1, y1, x2, y2]}
  generic   JSON list / JSONL {question_id, image, question, answers}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from megavlm.eval.formats.refer import (OCID_SIZE, PlainUnpickler, load_plain_pickle, read_ocid_ref,
                                        read_refcoco, read_refer)
from megavlm.eval.formats.vqa import (coco_file_name, read_generic, read_gqa, read_pope, read_textvqa,
                                      read_vqav2)
from megavlm.eval.questions import VisionQuestion, load_json_or_lines
from megavlm.eval.runner import EvalError

LAYOUTS: dict[str, str] = {
    "vqav2": 'VQAv2 questions {"questions": [{image_id, question, question_id}]}',
    "gqa": "GQA {qid: {imageId, question, answer, ...}}",
    "textvqa": 'TextVQA {"data": [{question_id, question, image_id, answers, ocr_tokens}]}',
    "pope": "POPE JSON lines {question_id, image, text, label}",
    "refcoco": "REFER refs(unc|umd|google).p pickle + instances.json",
    "ocid_ref": "OCID-Ref {example_id: {scene_path, sentence, bbox, take_id}}",
    "refer": "prepared referring expressions [{image, expression, bbox}]",
    "generic": "generic [{question_id, image, question, answers}]",
}

READERS: dict[str, Callable[..., list[VisionQuestion]]] = {
    "vqav2": read_vqav2, "gqa": read_gqa, "textvqa": read_textvqa, "pope": read_pope,
    "refcoco": read_refer, "ocid_ref": read_ocid_ref, "refer": read_refer, "generic": read_generic,
}
"""Reader per ``megavlm eval vision --task`` name. ``refcoco`` here reads prepared records (one
file); the published refs pickle + instances pair is :func:`read_refcoco`."""


def _known() -> str:
    return "; ".join(f"{k}: {v}" for k, v in LAYOUTS.items())


def _first(recs: list) -> Optional[dict]:
    return recs[0] if recs and isinstance(recs[0], dict) else None


def detect_layout(path: str | Path) -> str:
    """The layout of a question file, judged by its structure; an error naming the file and the
    known layouts when none fits."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"question file not found: {path}")
    if path.suffix in (".p", ".pkl", ".pickle"):
        return "refcoco"
    try:
        d: Any = load_json_or_lines(path)
    except EvalError as e:
        raise EvalError(f"{e}; known layouts: {_known()}") from None
    if isinstance(d, dict):
        if isinstance(d.get("questions"), list):
            return "vqav2"
        if isinstance(d.get("data"), list):
            return "textvqa"
        vals = list(d.values())
        if vals and all(isinstance(v, dict) for v in vals):
            if all("imageId" in v for v in vals):
                return "gqa"
            if all("scene_path" in v for v in vals):
                return "ocid_ref"
        if {"question_id", "image", "text", "label"} <= set(d):
            return "pope"  # a POPE file with one line
    elif isinstance(d, list) and (r := _first(d)) is not None:
        keys = set(r)
        if "scene_path" in keys:
            return "ocid_ref"
        if {"text", "label"} <= keys and "image" in keys:
            return "pope"
        if ("bbox" in keys or "box" in keys) and keys & {"expression", "sentence"}:
            return "refer"
        if keys & {"image", "image_id"} and keys & {"question", "text"}:
            return "generic"
    raise EvalError(f"{path}: unknown question file layout; known layouts: {_known()}")


def read_questions(path: str | Path, layout: Optional[str] = None, **kwargs) -> list[VisionQuestion]:
    """Read a question file in ``layout`` (default: detected). RefCOCO needs ``instances=``."""
    layout = layout or detect_layout(path)
    if layout == "refcoco" and Path(path).suffix in (".p", ".pkl", ".pickle"):
        inst = kwargs.pop("instances", None) or Path(path).parent / "instances.json"
        return read_refcoco(path, inst, **kwargs)
    if layout not in READERS:
        raise EvalError(f"{path}: unknown layout {layout!r}; known layouts: {_known()}")
    return READERS[layout](path, **kwargs)


def missing_images(questions: Sequence[VisionQuestion], image_dir: str | Path) -> list[str]:
    """The distinct image references of ``questions`` with no file under ``image_dir``, in order."""
    root = Path(image_dir)
    seen: dict[str, None] = {}
    for q in questions:
        if q.image not in seen and not (root / q.image).is_file():
            seen[q.image] = None
    return list(seen)


def check_images(questions: Sequence[VisionQuestion], image_dir: str | Path, source: str | Path,
                 show: int = 5) -> None:
    """An error counting the images ``source`` references that ``image_dir`` lacks, with the first few."""
    gone = missing_images(questions, image_dir)
    if gone:
        total = len({q.image for q in questions})
        more = f", … ({len(gone) - show} more)" if len(gone) > show else ""
        raise EvalError(f"{source}: {len(gone)} of {total} images are missing from {image_dir}: "
                        f"{', '.join(gone[:show])}{more}")


__all__ = ["LAYOUTS", "READERS", "VisionQuestion", "detect_layout", "read_questions", "missing_images",
           "check_images", "read_vqav2", "read_gqa", "read_textvqa", "read_pope", "read_generic",
           "read_refcoco", "read_ocid_ref", "read_refer", "PlainUnpickler", "load_plain_pickle",
           "coco_file_name", "OCID_SIZE"]
