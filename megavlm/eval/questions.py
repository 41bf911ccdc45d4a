"""One vision question, and the small JSON helpers every question reader shares.

Kept apart from the readers (megavlm.eval.formats) and from running (megavlm.eval.vision) so
that both can import it without importing each other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from megavlm.eval.runner import EvalError


@dataclass(frozen=True)
class VisionQuestion:
    """One question about one image; which answer fields are set depends on the task.

    ``image`` is how the question names its image: the file path relative to the task's image
    folder for the published formats (``COCO_val2014_000000000042.jpg``, ``n161313.jpg``,
    ``train_images/0054c91397f2fe05.jpg``), or any key an embedding store can be searched by.
    """

    qid: str
    image: str
    question: str
    answers: tuple[str, ...] = ()
    label: Optional[bool] = None
    box: Optional[tuple[float, float, float, float]] = None
    split: str = ""
    ocr: tuple[str, ...] = ()
    """OCR tokens shipped with the question (TextVQA); used only by prompts that ask for them."""


def load_json(path: str | Path) -> Any:
    """A JSON file, or a JSONL file (a list of its lines) when it is named ``.jsonl``."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"question file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            return [json.loads(l) for l in text.splitlines() if l.strip()]
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise EvalError(f"{path}: not valid JSON ({e})") from None


def load_json_or_lines(path: str | Path) -> Any:
    """JSON, falling back to JSON lines whatever the suffix (POPE ships JSONL named ``.json``)."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"question file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise EvalError(f"{path}:{n}: neither a JSON document nor JSON lines ({e})") from None
    return out


def need(rec: Any, keys: Sequence[str], where: str) -> Any:
    """The first of ``keys`` present in ``rec``; an error naming ``where`` when none is."""
    if not isinstance(rec, dict):
        raise EvalError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for k in keys:
        if k in rec:
            return rec[k]
    raise EvalError(f"{where}: record has none of the fields {list(keys)}")
