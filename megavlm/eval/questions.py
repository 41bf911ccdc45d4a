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


def _read_questions(path: str | Path) -> tuple[Path, str]:
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"question file not found: {path}")
    return path, path.read_text(encoding="utf-8")


def _json_lines(text: str, path: Path, what: str) -> list:
    """One JSON record a line (blank lines skipped); a bad record is named by its own line."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise EvalError(f"{path}:{n}: {what} ({e})") from None
    return out


def load_json(path: str | Path) -> Any:
    """A JSON file, or a JSONL file (a list of its lines) when it is named ``.jsonl``."""
    path, text = _read_questions(path)
    if path.suffix == ".jsonl":
        return _json_lines(text, path, "not valid JSON")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise EvalError(f"{path}: not valid JSON ({e})") from None


def load_json_or_lines(path: str | Path) -> Any:
    """JSON, falling back to JSON lines whatever the suffix (POPE ships JSONL named ``.json``)."""
    path, text = _read_questions(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return _json_lines(text, path, "neither a JSON document nor JSON lines")


def need(rec: Any, keys: Sequence[str], where: str) -> Any:
    """The first of ``keys`` present in ``rec``; an error naming ``where`` when none is."""
    if not isinstance(rec, dict):
        raise EvalError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for k in keys:
        if k in rec:
            return rec[k]
    raise EvalError(f"{where}: record has none of the fields {list(keys)}")
