"""LLaVA-format conversations -> tokens + per-token loss targets + image references.

Layout of one formatted conversation (the image part ``[P x IMAGE][SEP]`` is prepended by the
loader, megavlm.data.sources, because P belongs to the encoder, not to the text):

    [SYSTEM] system prompt [SEP]          masked (optional)
    [USER] human turn [SEP]                masked
    [ASSISTANT] model answer [SEP]         role marker masked, answer and its SEP trained
    ... more turns ...
    [EOD]                                  trained

Only model answers (plus their closing SEP and the final EOD) are targets. Human turns are built by
megavlm.data.prompt.user_turn (``<image>`` removed, outer whitespace stripped), the function
evaluation asks questions through, so evaluation prompts are training prefixes token for token;
the image goes first in the sample. Images are referenced by their key in the embedding store,
whose fingerprint the set records (a re-encoded store is detected when the set is opened). Bad records (no model
answer, unknown role, ``<image>`` without an image, image missing from the store) raise errors
naming the file and the record.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from megavlm.data.indexed import DataError, EmbeddingStore, IndexedWriter, store_prefix, token_dtype
from megavlm.data.prompt import IMAGE_TAG, user_text, user_turn
from megavlm.data.tokenizer import Tokenizer
from megavlm.run_folder import CONVERSATION_META, IMAGES
HUMAN = ("human", "user")
MODEL = ("gpt", "assistant", "model")


def format_conversation(rec: dict[str, Any], tok: Tokenizer, where: str) -> tuple[list[int], list[int]]:
    """(tokens, targets) of one LLaVA record, without the image part."""
    turns = rec.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: no 'conversations' list")
    sp = tok.special
    ids: list[int] = []
    tgt: list[int] = []

    def add(t: Sequence[int], trained: bool) -> None:
        ids.extend(t)
        tgt.extend([int(trained)] * len(t))

    system = rec.get("system")
    if turns[0].get("from") == "system":
        system, turns = turns[0].get("value"), turns[1:]
    if system:
        add([sp.system] + tok.encode(str(system)) + [sp.sep], False)
    answers = 0
    has_image = bool(rec.get("image"))
    tags = 0
    for j, t in enumerate(turns):
        role, value = t.get("from"), t.get("value")
        if not isinstance(value, str):
            raise DataError(f"{where}: turn {j} has no text value")
        tags += value.count(IMAGE_TAG)
        expect_human = j % 2 == 0
        if role in HUMAN:
            if not expect_human:
                raise DataError(f"{where}: turn {j} is a second human turn in a row")
            add(user_turn(tok, value), False)  # the one user-turn function evaluation asks through too
            continue
        value = user_text(value)
        if role in MODEL:
            if expect_human:
                raise DataError(f"{where}: turn {j} is a model answer without a human turn before it")
            if not value:
                raise DataError(f"{where}: turn {j} is an empty model answer")
            add([sp.assistant], False)
            add(tok.encode(value) + [sp.sep], True)
            answers += 1
        else:
            raise DataError(f"{where}: turn {j} has unknown role {role!r} (expected human/gpt)")
    if answers == 0:
        raise DataError(f"{where}: conversation has no model answer")
    if tags and not has_image:
        raise DataError(f"{where}: '<image>' in the text but the record names no image")
    if tags > 1:
        raise DataError(f"{where}: {tags} '<image>' tags; one image per conversation is supported")
    add([sp.eod], True)
    return ids, tgt


@dataclass
class ConversationStats:
    conversations: int = 0
    with_image: int = 0
    tokens: int = 0
    trained_tokens: int = 0


def load_llava(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    try:
        raw = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: invalid UTF-8 at byte {e.start} ({e.reason})") from None
    if path.suffix == ".jsonl":  # one record a line: a bad one is reported at its own line
        out = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        return out
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of conversations")
    return data


FORMAT = "megavlm-conversations/2"
"""Conversation sets of this format name each conversation's image by its store key and record the
store's fingerprint; older ones (no ``format`` in their meta) hold record numbers only."""
MAX_LISTED = 1000
"""At most this many bad records are listed in one error (the total is always given)."""


def numbered_records(path: str | Path) -> list[tuple[str, Any]]:
    """(where, record) of every record of a LLaVA file; ``where`` counts from 1: ``file:LINE`` for
    ``.jsonl`` (the record's own line), ``file: record N`` for a JSON list."""
    path = Path(path)
    if path.suffix == ".jsonl":
        raw = path.read_bytes().decode("utf-8", errors="replace")
        lines = [n for n, line in enumerate(raw.splitlines(), 1) if line.strip()]
        recs = load_llava(path)
        return [(f"{path}:{n}", r) for n, r in zip(lines, recs)]
    return [(f"{path}: record {k}", r) for k, r in enumerate(load_llava(path), 1)]


def preprocess_conversations(inputs: Sequence[str | Path], out_prefix: str | Path, tok: Tokenizer, *,
                             embeds: Optional[str | Path] = None) -> ConversationStats:
    """Write ``<out>.{bin,idx}``, ``<out>.mask.{bin,idx}``, ``<out>.images.npy`` and
    ``<out>.meta.json``. ``embeds`` is the embedding store (from tools/encode_images.py) whose keys
    the records' ``image`` fields name; the meta file refers to it relative to the output, names
    each conversation's image by its key (``image_keys``) and records the store's fingerprint,
    so a store re-encoded with other contents is detected when the set is opened
    (``megavlm train --check``). ``images.npy`` holds the record numbers the keys had then.
    Every record naming an image missing from the store is listed in one error."""
    from megavlm.data.indexed import store_fingerprint

    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    keys: dict[str, int] = {}
    fingerprint = None
    if embeds is not None:
        embeds = store_prefix(embeds)  # data/captions and data/captions.embeds name the same store
        if not Path(f"{embeds}.json").is_file():
            raise DataError(f"{embeds}: no embedding store here (no {Path(embeds).name}.json); make it with "
                            f"tools/encode_images.py --output {str(embeds).removesuffix('.embeds')}")
        store = EmbeddingStore(embeds)
        keys = {k: i for i, k in enumerate(store.meta.keys or [])}
        fingerprint = store_fingerprint(embeds)
    stats = ConversationStats()
    images: list[int] = []
    image_keys: list[Optional[str]] = []
    missing: list[str] = []
    tmp_npy = out_prefix.with_name(f".{out_prefix.name}.images.tmp{os.getpid()}.npy")
    with IndexedWriter(out_prefix, token_dtype(tok.vocab_size)) as tw, \
            IndexedWriter(f"{out_prefix}.mask", np.uint8) as mw:
        for path in inputs:
            for loc, rec in numbered_records(path):
                where = f"{loc} (id {rec.get('id', '?')})" if isinstance(rec, dict) else loc
                if not isinstance(rec, dict):
                    raise DataError(f"{where}: not a JSON object")
                ids, tgt = format_conversation(rec, tok, where)
                img = -1
                key = rec.get("image") or None
                if key:
                    if embeds is None:
                        raise DataError(f"{where}: names image {key!r} but no embedding "
                                        f"store was given (--embeds)")
                    if key not in keys:
                        missing.append(f"{where}: image {key!r}")
                    else:
                        img = keys[key]
                    stats.with_image += 1
                tw.add(ids)
                mw.add(tgt)
                images.append(img)
                image_keys.append(str(key) if key else None)
                stats.conversations += 1
                stats.tokens += len(ids)
                stats.trained_tokens += sum(tgt)
        if missing:
            listed = "\n  ".join(missing[:MAX_LISTED])
            more = f"\n  ... and {len(missing) - MAX_LISTED} more" if len(missing) > MAX_LISTED else ""
            raise DataError(f"{len(missing)} conversation(s) name an image that is not in {embeds} "
                            f"({len(keys)} keys; keys are paths relative to the encode's --input):\n  "
                            f"{listed}{more}")
        if not stats.conversations:
            raise DataError(f"{', '.join(map(str, inputs))}: no conversations")
        np.save(tmp_npy, np.asarray(images, dtype=np.int64))
    tmp_npy.replace(f"{out_prefix}{IMAGES}")
    meta = {"format": FORMAT,
            "embeds": os.path.relpath(embeds, out_prefix.parent) if embeds else None,
            "store_fingerprint": fingerprint,
            "conversations": stats.conversations,
            "image_keys": image_keys}
    meta_path = Path(f"{out_prefix}{CONVERSATION_META}")
    tmp = meta_path.with_name(f".{meta_path.name}.tmp")
    tmp.write_text(json.dumps(meta))
    tmp.replace(meta_path)
    return stats
