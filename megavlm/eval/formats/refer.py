"""Readers of the referring-expression benchmarks: RefCOCO / RefCOCO+ / RefCOCOg and OCID-Ref.

RefCOCO* ship as the REFER toolkit's ``refs(unc).p`` / ``refs(umd).p`` / ``refs(google).p`` — a
Python 2 pickle (protocol 2) of plain dicts, lists, strings and numbers — next to a COCO-style
``instances.json``. A pickle can name any importable callable and have the loader call it, so
the refs file is read by :class:`PlainUnpickler`, whose ``find_class`` admits nothing: plain
containers and numbers never reach it, and any other object ends the read with an error naming
the file and the class, before anything is called.

Boxes: a ref's annotation box is COCO ``[x, y, w, h]`` in pixels; it becomes ``[x1, y1, x2, y2]``
normalized by the image's width and height from ``instances.json`` ``images`` and rounded to two
decimals, as TRI-ML/vlm-evaluation builds its RefCOCO index (harnesses/refcoco.py). Every
sentence of a ref is one question; the default split is ``val`` (the one vlm-evaluation scores).

OCID-Ref ships ``{example_id: {scene_path, sentence, bbox: "[x1, y1, x2, y2]", take_id, …}}``
with pixel boxes of 640 x 480 images (vlm-evaluation harnesses/ocidref.py); a record's own
``width`` / ``height`` win when present. ``take_id`` gives the clutter split (free 0-9,
touching 10-16, stacked 17-20).
"""

from __future__ import annotations

import io
import pickle
import re
from bisect import bisect_left
from pathlib import Path
from typing import Any, Optional, Sequence

from megavlm.eval.questions import VisionQuestion, load_json, need
from megavlm.eval.runner import EvalError

OCID_SIZE = (640, 480)
_NUM = r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?"
_BOX = re.compile(rf"\[\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\]")


class PlainUnpickler(pickle.Unpickler):
    """An unpickler that builds dicts, lists, tuples, strings and numbers only: every class or
    function the stream names is refused (nothing is imported, nothing is called)."""

    def __init__(self, f, source: str):
        super().__init__(f, encoding="utf-8", errors="strict")
        self.source = source

    def find_class(self, module: str, name: str):
        raise EvalError(f"{self.source}: refused to unpickle {module}.{name}: the refs file may hold "
                        f"only dicts, lists, strings and numbers (a pickle naming a class or function "
                        f"could run code; this one was not loaded)")

    def persistent_load(self, pid):
        raise EvalError(f"{self.source}: refused a persistent reference {pid!r} in the pickle")


def load_plain_pickle(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"refs file not found: {path}")
    try:
        return PlainUnpickler(io.BytesIO(path.read_bytes()), str(path)).load()
    except EvalError:
        raise
    except (pickle.UnpicklingError, EOFError, UnicodeDecodeError, ValueError, TypeError) as e:
        raise EvalError(f"{path}: not a readable refs pickle ({e})") from None


def _normalize_xyxy(box: Sequence[float], width: float, height: float, where: str) -> tuple[float, ...]:
    x1, y1, x2, y2 = (float(v) for v in box)
    if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
        raise EvalError(f"{where}: box [{x1}, {y1}, {x2}, {y2}] is not inside the {width:g}x{height:g} image")
    return tuple(round(v, 2) for v in (x1 / width, y1 / height, x2 / width, y2 / height))


def read_refcoco(refs: str | Path, instances: str | Path,
                 splits: Optional[Sequence[str]] = ("val",)) -> list[VisionQuestion]:
    """One question per sentence of every ref in ``splits`` (None: all splits)."""
    data = load_plain_pickle(refs)
    if not isinstance(data, list) or not all(isinstance(r, dict) and "ann_id" in r and "sentences" in r
                                             for r in data):
        raise EvalError(f"{refs}: not a REFER refs file (expected a list of refs with 'ann_id' and "
                        f"'sentences')")
    inst = load_json(instances)
    if not isinstance(inst, dict) or not isinstance(inst.get("images"), list) \
            or not isinstance(inst.get("annotations"), list):
        raise EvalError(f"{instances}: not a COCO instances file (needs 'images' and 'annotations' lists)")
    images = {im["id"]: im for im in inst["images"] if isinstance(im, dict) and "id" in im}
    anns = {a["id"]: a for a in inst["annotations"] if isinstance(a, dict) and "id" in a}
    out = []
    for r in data:
        if splits is not None and r.get("split") not in splits:
            continue
        where = f"{refs}: ref {r.get('ref_id')}"
        ann = anns.get(r["ann_id"])
        if ann is None:
            raise EvalError(f"{where}: annotation {r['ann_id']} is not in {instances}")
        im = images.get(ann.get("image_id", r.get("image_id")))
        if im is None:
            raise EvalError(f"{where}: image {r.get('image_id')} is not in {instances} 'images'")
        x, y, w, h = (float(v) for v in need(ann, ("bbox",), f"{instances}: annotation {ann['id']}"))
        box = _normalize_xyxy((x, y, x + w, y + h), float(im["width"]), float(im["height"]), where)
        name = str(im.get("file_name") or f"COCO_train2014_{int(im['id']):012d}.jpg")
        for k, s in enumerate(r["sentences"]):
            sent = need(s, ("sent", "raw"), f"{where} sentence {k}")
            out.append(VisionQuestion(f"{r.get('ref_id')}-{s.get('sent_id', k)}", name, str(sent),
                                      box=box, split=str(r.get("split", ""))))  # type: ignore[arg-type]
    return out


def _clutter(take_id: Any) -> str:
    t = int(take_id)
    if not 0 <= t <= 20:
        raise ValueError(f"take_id {t} is not in [0, 20]")
    return ("free", "touching", "stacked")[bisect_left([9, 16, 20], t)]


def read_ocid_ref(path: str | Path, image_size: tuple[int, int] = OCID_SIZE) -> list[VisionQuestion]:
    """OCID-Ref expressions ``{example_id: {scene_path, sentence, bbox, take_id}}`` (a list of such
    records is read too)."""
    d = load_json(path)
    items = list(d.items()) if isinstance(d, dict) else list(enumerate(d)) if isinstance(d, list) else None
    if not items or not all(isinstance(v, dict) and "scene_path" in v for _, v in items):
        raise EvalError(f"{path}: not an OCID-Ref file (expected records with 'scene_path', 'sentence', 'bbox')")
    out = []
    for k, v in items:
        where = f"{path}: example {k}"
        raw = need(v, ("bbox",), where)
        if isinstance(raw, str):
            m = _BOX.fullmatch(raw.strip())
            if m is None:
                raise EvalError(f"{where}: bbox {raw!r} is not '[x1, y1, x2, y2]'")
            raw = [float(g) for g in m.groups()]
        if not isinstance(raw, (list, tuple)) or len(raw) != 4:
            raise EvalError(f"{where}: bbox must be [x1, y1, x2, y2] in pixels")
        w, h = float(v.get("width", image_size[0])), float(v.get("height", image_size[1]))
        split = ""
        if "take_id" in v:
            try:
                split = _clutter(v["take_id"])
            except (TypeError, ValueError) as e:
                raise EvalError(f"{where}: {e}") from None
        out.append(VisionQuestion(str(k), str(v["scene_path"]), str(need(v, ("sentence",), where)),
                                  box=_normalize_xyxy(raw, w, h, where), split=split))  # type: ignore[arg-type]
    return out


def read_refer(path: str | Path) -> list[VisionQuestion]:
    """Prepared referring-expression records ``{image, expression|sentence, bbox: [x1, y1, x2, y2]
    normalized}`` (JSON list or JSONL)."""
    recs = load_json(path)
    if not isinstance(recs, list):
        raise EvalError(f"{path}: not a list of referring-expression records")
    out = []
    for i, r in enumerate(recs):
        where = f"{path}: record {i}"
        box = tuple(float(v) for v in need(r, ("bbox", "box"), where))
        if len(box) != 4:
            raise EvalError(f"{where}: bbox must be [x1, y1, x2, y2]")
        expr = str(need(r, ("expression", "sentence", "question"), where))
        out.append(VisionQuestion(str(r.get("question_id", i)), str(need(r, ("image", "image_id"), where)),
                                  expr, box=box))  # type: ignore[arg-type]
    return out
