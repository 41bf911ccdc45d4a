"""WebDataset tar shards as img2dataset writes them (``KEY.jpg|jpeg|png|webp`` + ``KEY.txt`` +
``KEY.json``), read with webdataset's own tar iterators (no hand-written tar walker).

The caption comes from a rule: a comma list of sources tried in order, each ``SUFFIX`` (a text
member, e.g. ``txt``) or ``SUFFIX:FIELD`` (a field of a JSON member, e.g. ``json:caption`` or
DataComp-DR's ``syn.json:syn_text``). A field holding several captions is chosen from with
``choice``: ``first``, or ``hash`` = sha256(seed, key) mod n — deterministic, independent of the
worker count and order. :func:`caption_rule_meta` is what the store's metadata records.

Problems are named by shard file and member key: a corrupt or truncated tar, a sample without an
image or without a caption, a key that appears twice. Without ``reject`` they raise; with it they
are reported and the sample skipped (a broken tar keeps the samples completed before the break).
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from megavlm.data.indexed import DataError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CHOICES = ("first", "hash")


@dataclass
class TarSample:
    key: str
    image: bytes
    caption: Optional[str]
    where: str


@dataclass(frozen=True)
class CaptionRule:
    sources: tuple[str, ...] = ("txt",)
    choice: str = "first"
    seed: int = 0

    @classmethod
    def parse(cls, spec: str, choice: str = "first", seed: int = 0) -> "CaptionRule":
        if choice not in CHOICES:
            raise ValueError(f"caption choice must be one of {CHOICES}, got {choice!r}")
        srcs = tuple(s.strip() for s in spec.split(",") if s.strip())
        if not srcs:
            raise ValueError(f"empty caption rule {spec!r}")
        return cls(srcs, choice, seed)

    def meta(self) -> dict:
        return {"caption_sources": list(self.sources), "caption_choice": self.choice, "caption_seed": self.seed}

    def pick(self, sample: dict, key: str) -> Optional[str]:
        for src in self.sources:
            suffix, _, fieldname = src.partition(":")
            raw = sample.get(suffix)
            if raw is None:
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"member {key}.{suffix} is not UTF-8 ({e.reason})") from None
            if not fieldname:
                value = text.strip().splitlines()[0].strip() if text.strip() else ""
            else:
                try:
                    value = json.loads(text).get(fieldname)
                except (json.JSONDecodeError, AttributeError) as e:
                    raise ValueError(f"member {key}.{suffix} is not a JSON object ({e})") from None
                if isinstance(value, list):
                    value = [v for v in value if isinstance(v, str) and v.strip()]
                    if not value:
                        continue
                    if self.choice == "hash":
                        h = hashlib.sha256(f"{self.seed}\0{key}".encode()).digest()
                        value = value[int.from_bytes(h[:8], "little") % len(value)]
                    else:
                        value = value[0]
            if isinstance(value, str) and value.strip():
                return value.strip()
        return None


def _image_of(sample: dict) -> Optional[bytes]:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    return None


def _truncation(path: Path, problem: Callable[[str], None]) -> Optional[str]:
    """A tar is a whole number of 512-byte blocks; when the file is not, the stream reader may end
    quietly inside the last member. Report it (naming the last member) and return that member's
    key, whose sample must not be used."""
    from webdataset.tariterators import base_plus_ext

    size = path.stat().st_size
    if size % 512 == 0:
        return None
    last = "(none)"
    try:
        with tarfile.open(path, "r|*") as t:
            for m in t:
                last = m.name
    except (tarfile.TarError, EOFError, OSError):
        pass
    problem(f"{path}: corrupt or truncated tar after member {last} ({size} bytes is not a whole "
            f"number of 512-byte tar blocks)")
    return base_plus_ext(last)[0]


def read_tar_shard(path: str | Path, rule: Optional[CaptionRule] = CaptionRule(),
                   reject: Optional[Callable[[str], None]] = None) -> list[TarSample]:
    """Every sample of one shard in member order (``rule=None``: images only, no captions)."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such tar shard")

    def problem(msg: str) -> None:
        if reject is None:
            raise DataError(msg)
        reject(msg)

    out: list[TarSample] = []
    seen: set[str] = set()
    bad_key = _truncation(path, problem)
    last = "(start of the shard)"
    read = ["(none)"]

    def members(f):
        for m in tar_file_iterator(f):
            read[0] = m["fname"]
            yield {**m, "__url__": str(path)}

    with open(path, "rb") as f:
        members = members(f)
        try:
            for sample in group_by_keys(members):
                key = sample["__key__"]
                if key == bad_key:
                    continue  # the sample cut by the truncation (reported above)
                where = f"{path}: member {key}"
                last = key
                if key in seen:
                    problem(f"{where}: key appears twice in the shard (duplicate key)")
                    continue
                seen.add(key)
                img = _image_of(sample)
                if img is None:
                    exts = sorted(k for k in sample if not k.startswith("__"))
                    problem(f"{where}: no image member (.{'/.'.join(IMAGE_EXTS)}); has {exts}")
                    continue
                cap = None
                if rule is not None:
                    try:
                        cap = rule.pick(sample, key)
                    except ValueError as e:
                        problem(f"{where}: {e}")
                        continue
                    if cap is None:
                        problem(f"{where}: no caption ({', '.join(rule.sources)})")
                        continue
                out.append(TarSample(key, img, cap, where))
        except DataError:
            raise
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            msg = str(e.args[0]) if e.args else type(e).__name__
            if "duplicate file name" in msg:
                problem(f"{path}: member {last}: duplicate member in the tar ({msg.split(':')[0]})")
            else:
                problem(f"{path}: corrupt or truncated tar after member {read[0]} (last complete sample "
                        f"{last}; {type(e).__name__}: {msg})")
    return out
