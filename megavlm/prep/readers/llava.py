"""LLaVA-style conversations (LLaVA-665k: one JSON list, or JSONL) with an image root.

LLaVA-665k's ``image`` fields are paths relative to a root holding coco/, gqa/, ocr_vqa/,
textvqa/, vg/; ~40k records have no image (text-only) and many are multi-turn. The image key an
embedding store records is the ``image`` field itself, so ``tools/preprocess_conversations.py``
finds each conversation's image in the store made by ``tools/encode_images.py --input llava.json
--image-root ROOT --no-captions``. A record whose image is missing under the root is named (file,
record number, id, path) before any work; with the skip policy it is dropped and listed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from megavlm.data.indexed import DataError

MAX_LISTED = 20


def _where(path, r: int, rec: Any) -> str:
    rid = rec.get("id", "?") if isinstance(rec, dict) else "?"
    return f"{path}: record {r} (id {rid})"


def missing_images(inputs: Sequence[str | Path], image_root: str | Path) -> list[tuple[Path, int, str]]:
    """(file, record number, message) of every record whose image is not a file under the root."""
    from megavlm.prep.conversations import load_llava

    root = Path(image_root)
    if not root.is_dir():
        raise DataError(f"{root}: image root is not a folder")
    out = []
    for path in inputs:
        for r, rec in enumerate(load_llava(path)):
            img = rec.get("image") if isinstance(rec, dict) else None
            if img and not (root / img).is_file():
                out.append((Path(path), r, f"{_where(path, r, rec)}: image {img!r} not found under {root}"))
    return out


def check_images(inputs: Sequence[str | Path], image_root: str | Path, *, skip: bool = False,
                 workdir: Optional[Path] = None) -> tuple[list[Path], list[str]]:
    """(inputs to preprocess, rejects). Missing images raise (all named, the first MAX_LISTED)
    unless ``skip``: then the records that have them are left out of filtered copies of the
    inputs (JSONL under ``workdir``) and listed."""
    miss = missing_images(inputs, image_root)
    if not miss:
        return [Path(p) for p in inputs], []
    msgs = [m for _, _, m in miss]
    if not skip:
        more = f"\n  … and {len(msgs) - MAX_LISTED} more" if len(msgs) > MAX_LISTED else ""
        raise DataError(f"{len(msgs)} conversation(s) name an image missing under {image_root}, nothing "
                        f"prepared:\n  " + "\n  ".join(msgs[:MAX_LISTED]) + more)
    from megavlm.prep.conversations import load_llava

    assert workdir is not None
    workdir.mkdir(parents=True, exist_ok=True)
    drop = {(p, r) for p, r, _ in miss}
    out = []
    for k, path in enumerate(inputs):
        keep = [rec for r, rec in enumerate(load_llava(path)) if (Path(path), r) not in drop]
        dst = workdir / f"{k:04d}-{Path(path).stem}.filtered.jsonl"
        tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
        tmp.write_text("".join(json.dumps(rec) + "\n" for rec in keep))
        tmp.replace(dst)
        out.append(dst)
    return out, msgs


def image_records(inputs: Sequence[str | Path], image_root: str | Path,
                  reject: Optional[Callable[[str], None]] = None) -> list:
    """The distinct images the conversations name, as encoder input records (key = the ``image``
    field, path under the root), in first-use order; text-only records contribute nothing."""
    from megavlm.prep.conversations import load_llava
    from megavlm.encoders import ImageRecord

    root = Path(image_root)
    if not root.is_dir():
        raise DataError(f"{root}: image root is not a folder")
    seen: set[str] = set()
    out = []
    problems = []
    for path in inputs:
        for r, rec in enumerate(load_llava(path)):
            img = rec.get("image") if isinstance(rec, dict) else None
            if not img or img in seen:
                continue
            p = root / img
            where = _where(path, r, rec)
            if not p.is_file():
                msg = f"{where}: image {img!r} not found under {root}"
                if reject is None:
                    problems.append(msg)
                else:
                    reject(msg)
                continue
            seen.add(img)
            out.append(ImageRecord(p, img, None, where))
    if problems:
        more = f"\n  … and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise DataError(f"{len(problems)} conversation image(s) missing, nothing encoded:\n  "
                        + "\n  ".join(problems[:MAX_LISTED]) + more)
    return out
