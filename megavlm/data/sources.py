"""Sources: turn prepared indexed files into ``Sample`` s of one kind (text, captions, instructions).

A source knows, before reading any tokens, the length in positions of every sample it can give
(``lengths``), so the mixture can plan rows from lengths alone and read only the rows a data
parallel rank needs. Layouts on disk (all written by tools/):

- text: ``<prefix>.{bin,idx}``, one document per record, EOD already appended (megatron style).
  Text is a stream: the mixture may take any piece ``(doc, offset, length)`` of a document.
- captions: ``<prefix>.{bin,idx}`` caption tokens (no specials), record i describes image i of
  the embedding store ``<prefix>.embeds``. Sample = ``[P x IMAGE][SEP] caption [EOD]``.
- instructions: ``<prefix>.{bin,idx}`` formatted conversation tokens (role markers, SEPs, EOD),
  ``<prefix>.mask.{bin,idx}`` uint8 targets, ``<prefix>.meta.json`` naming the embedding store,
  its fingerprint and each conversation's image *key* (resolved against the store when opened; a
  store re-encoded since is an error), ``<prefix>.images.npy`` the record numbers the keys had at
  preprocessing (-1 = none; all that sets made before keys were recorded have).
  Sample = ``[P x IMAGE][SEP]`` (if it has an image) + conversation.

A caption or conversation sample longer than the sequence is truncated (and counted) or rejected
with an error naming file and record, per ``DataConfig.too_long``; text is never too long because
the mixture cuts its stream into row-sized pieces.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np

from megavlm.data.batch import Sample, image_head
from megavlm.data.indexed import DataError, EmbeddingStore, TokenData
from megavlm.data.tokenizer import Tokenizer
from megavlm.run_folder import CONVERSATION_META, IMAGES

Kind = Literal["text", "captions", "instructions"]


class TextSource:
    """Plain-text documents from one or more token datasets, addressed as one list."""

    kind: Kind = "text"

    def __init__(self, prefixes: Sequence[str | Path]):
        if not prefixes:
            raise DataError("a text source needs at least one dataset")
        self.parts = [TokenData(p) for p in prefixes]
        self.lengths = np.concatenate([p.lengths for p in self.parts]).astype(np.int64)
        self._starts = np.cumsum([0] + [len(p) for p in self.parts])
        self._ones = np.ones(0, dtype=bool)
        self.truncated = 0
        self.name = ",".join(str(p) for p in prefixes)

    def __len__(self) -> int:
        return len(self.lengths)

    def _locate(self, i: int) -> tuple[TokenData, int]:
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self.parts[k], i - int(self._starts[k])

    def sample(self, i: int, offset: int = 0, length: Optional[int] = None) -> Sample:
        part, j = self._locate(i)
        toks = part.get(j, offset, length, np.int64)
        n = len(toks)
        if len(self._ones) < n:
            self._ones = np.ones(max(n, 2 * len(self._ones)), dtype=bool)
        return Sample(tokens=toks, target=self._ones[:n], source="text")


def _too_long(lengths: np.ndarray, seq_length: int, policy: str, what: str) -> tuple[np.ndarray, int]:
    long = np.flatnonzero(lengths > seq_length)
    if long.size and policy == "reject":
        i = int(long[0])
        raise DataError(f"{what}: record {i} is {int(lengths[i])} positions, longer than the "
                        f"sequence ({seq_length}); {long.size} such records (data.too_long=reject)")
    return np.minimum(lengths, seq_length), int(long.size)


class CaptionSource:
    """Image-caption pairs: ``[P x IMAGE][SEP] caption [EOD]``, loss on caption and EOD."""

    kind: Kind = "captions"

    def __init__(self, prefix: str | Path, tok: Tokenizer, *, embed_dim: int, num_patches: int,
                 seq_length: int, too_long: str = "truncate", encoder: Optional[str] = None):
        self.name = str(prefix)
        self.captions = TokenData(prefix)
        self.store = EmbeddingStore(f"{prefix}.embeds", embed_dim=embed_dim, num_patches=num_patches,
                                    encoder=encoder)
        if len(self.store) != len(self.captions):
            raise DataError(f"{prefix}: {len(self.captions)} captions but {len(self.store)} images "
                            f"in {prefix}.embeds")
        self.P = num_patches
        if self.P + 2 > seq_length:
            raise DataError(f"{prefix}: an image takes {self.P} positions + SEP + EOD, more than "
                            f"the sequence ({seq_length})")
        empty = np.flatnonzero(self.captions.lengths == 0)
        if empty.size:
            raise DataError(f"{prefix}.bin: record {int(empty[0])} has an empty caption")
        full = self.captions.lengths + self.P + 2
        self.lengths, self.truncated = _too_long(full, seq_length, too_long, f"{prefix}.bin")
        self._head = image_head(tok, self.P)
        self._eod = np.array([tok.eod], dtype=np.int64)
        self._target = np.concatenate([np.zeros(self.P + 1, bool), np.ones(seq_length, bool)])

    def __len__(self) -> int:
        return len(self.lengths)

    def sample(self, i: int) -> Sample:
        n = int(self.lengths[i])
        toks = np.concatenate([self._head, self.captions.get(i, dtype=np.int64), self._eod])[:n]
        return Sample(tokens=toks, target=self._target[:n], image=self.store.get(i), image_start=0,
                      source="captions")


def _resolve_keys(prefix: Path, meta: dict, store_path: Path, store: EmbeddingStore) -> np.ndarray:
    """Record numbers of a keyed conversation set's images in ``store``, after checking that the
    store is the one the set was built against (its fingerprint)."""
    from megavlm.data.indexed import store_fingerprint

    rebuild = (f"re-run tools/preprocess_conversations.py --embeds {store_path} --output {prefix} "
               f"(with the same --input)")
    now = store_fingerprint(store_path)
    if meta.get("store_fingerprint") != now:
        raise DataError(f"conversation set {prefix}: embedding store {store_path} has changed since the "
                        f"set was built (fingerprint {meta.get('store_fingerprint')} -> {now}: re-encoded "
                        f"with other images or settings), so its images may be the wrong ones; {rebuild}")
    where = {k: i for i, k in enumerate(store.meta.keys or [])}
    out, gone = [], []
    for n, k in enumerate(meta["image_keys"], 1):
        if k is None:
            out.append(-1)
        elif k in where:
            out.append(where[k])
        else:
            gone.append(f"{n} ({k!r})")
    if gone:
        raise DataError(f"conversation set {prefix}: {len(gone)} image key(s) not in {store_path}, "
                        f"conversations {', '.join(gone[:20])}{' ...' if len(gone) > 20 else ''}; {rebuild}")
    return np.asarray(out, dtype=np.int64)


_WARNED_UNKEYED: set[str] = set()


def _warn_unkeyed(prefix: Path, store: Path) -> None:
    import logging

    if str(prefix) not in _WARNED_UNKEYED:
        _WARNED_UNKEYED.add(str(prefix))
        logging.getLogger(__name__).warning(
            "conversation set %s predates image keys (it holds record numbers of %s), so a re-encoded "
            "store cannot be detected; rebuild it with tools/preprocess_conversations.py --embeds %s "
            "--output %s", prefix, store, store, prefix)


class ConversationSource:
    """LLaVA-style conversations with per-token targets and an optional image."""

    kind: Kind = "instructions"

    def __init__(self, prefix: str | Path, tok: Tokenizer, *, embed_dim: int, num_patches: int,
                 seq_length: int, too_long: str = "truncate", encoder: Optional[str] = None):
        prefix = Path(prefix)
        self.name = str(prefix)
        self.tokens = TokenData(prefix)
        self.masks = TokenData(f"{prefix}.mask")
        if not np.array_equal(self.tokens.lengths, self.masks.lengths):
            bad = int(np.flatnonzero(self.tokens.lengths != self.masks.lengths)[0]) \
                if len(self.tokens) == len(self.masks) else min(len(self.tokens), len(self.masks))
            raise DataError(f"{prefix}.mask.bin: record {bad} does not match {prefix}.bin "
                            f"(tokens and loss masks differ in count or length)")
        img_path = Path(f"{prefix}{IMAGES}")
        meta_path = Path(f"{prefix}{CONVERSATION_META}")
        for p in (img_path, meta_path):
            if not p.is_file():
                raise DataError(f"{p}: missing (part of conversation dataset {prefix})")
        self.images = np.load(img_path)
        if self.images.shape != (len(self.tokens),):
            raise DataError(f"{img_path}: {self.images.shape[0]} image references for "
                            f"{len(self.tokens)} conversations")
        meta = json.loads(meta_path.read_text())
        self.store: Optional[EmbeddingStore] = None
        self.P = num_patches
        keyed = "image_keys" in meta
        if keyed and len(meta["image_keys"]) != len(self.tokens):
            raise DataError(f"{meta_path}: {len(meta['image_keys'])} image keys for {len(self.tokens)} "
                            f"conversations; rebuild with tools/preprocess_conversations.py")
        if (self.images >= 0).any() or (keyed and any(meta["image_keys"])):
            store = Path(meta["embeds"])
            store = store if store.is_absolute() else prefix.parent / store
            self.store = EmbeddingStore(store, embed_dim=embed_dim, num_patches=num_patches,
                                        encoder=encoder)
            if keyed:
                self.images = _resolve_keys(prefix, meta, store, self.store)
            else:
                _warn_unkeyed(prefix, store)
            bad = np.flatnonzero(self.images >= len(self.store))
            if bad.size:
                raise DataError(f"{img_path}: conversation {int(bad[0])} refers to image "
                                f"{int(self.images[bad[0]])}, store {store} has {len(self.store)}")
        full = self.tokens.lengths + np.where(self.images >= 0, self.P + 1, 0)
        self.lengths, self.truncated = _too_long(full, seq_length, too_long, f"{prefix}.bin")
        self._head = image_head(tok, self.P)
        self._no = np.zeros(self.P + 1, dtype=bool)

    def __len__(self) -> int:
        return len(self.lengths)

    def has_image(self, i: int) -> bool:
        return bool(self.images[i] >= 0)

    def sample(self, i: int) -> Sample:
        n = int(self.lengths[i])
        toks, mask = self.tokens.get(i, dtype=np.int64), self.masks.get(i, dtype=bool)
        img = int(self.images[i])
        if img >= 0:
            toks = np.concatenate([self._head, toks])
            mask = np.concatenate([self._no, mask])
            return Sample(tokens=toks[:n], target=mask[:n], image=self.store.get(img),  # type: ignore[union-attr]
                          image_start=0, source="instructions")
        return Sample(tokens=toks[:n], target=mask[:n], source="instructions")
