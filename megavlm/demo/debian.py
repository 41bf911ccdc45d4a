"""The demo's sources: Debian packages fetched with apt-get, and parsers of their file formats.

Why apart: the demo corpus must be built on a machine that reaches only package registries, so its
real text and images come from Debian packages (see shared ASSETS.md): the World English Bible
(``sword-text-web``, a SWORD zText module), WordNet 3.0 (``wordnet-base``), Fashion-MNIST
(``dataset-fashion-mnist``, IDX files) and Tux Paint stamps (``tuxpaint-stamps-default``). These
are one-off formats of one-off sources; nothing in the library reads them. The .deb files and
their extraction are cached under ``~/.cache/megavlm/debs`` (``$MEGAVLM_CACHE`` moves it).
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np

from megavlm.data.indexed import DataError

PACKAGES = {
    "sword-text-web": ["./usr/share/sword/modules/texts/ztext/*"],
    "wordnet-base": ["./usr/share/wordnet/data.*", "./usr/share/wordnet/index.*"],
    "dataset-fashion-mnist": ["./usr/share/datasets/fashion-mnist/*"],
    "tuxpaint-stamps-default": ["./usr/share/tuxpaint/stamps/*.png", "./usr/share/tuxpaint/stamps/*.txt"],
}


def default_cache() -> Path:
    return Path(os.environ.get("MEGAVLM_CACHE", "~/.cache/megavlm")).expanduser() / "debs"



# --------------------------------------------------------------------------------------------
# fetching the Debian packages


def fetch_package(name: str, cache: Path) -> Path:
    """Download ``name`` with apt-get (once) and extract the files we use; return the tree."""
    cache.mkdir(parents=True, exist_ok=True)
    tree = cache / "extract" / name
    if (tree / ".complete").is_file():
        return tree
    debs = sorted(cache.glob(f"{name}_*.deb"))
    if not debs:
        if shutil.which("apt-get") is None:
            raise RuntimeError(f"the demo corpus needs the Debian package {name}, and apt-get is not "
                               f"available; put {name}_*.deb into {cache}")
        for attempt in range(2):
            r = subprocess.run(["apt-get", "download", name], cwd=cache, capture_output=True, text=True)
            debs = sorted(cache.glob(f"{name}_*.deb"))
            if debs:
                break
            if attempt == 0:  # package lists may be missing on a fresh machine
                subprocess.run(["apt-get", "update"], capture_output=True, text=True)
        if not debs:
            raise RuntimeError(f"apt-get download {name} failed: {r.stderr.strip()[-500:]}")
    tmp = tree.with_name(f".{name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    deb = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(debs[-1])], stdout=subprocess.PIPE)
    tar = subprocess.run(["tar", "-x", "-C", str(tmp), "--wildcards", *PACKAGES[name]],
                         stdin=deb.stdout, capture_output=True, text=True)
    deb.stdout.close()  # type: ignore[union-attr]
    if deb.wait() != 0 or tar.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"extracting {debs[-1]} failed: {tar.stderr.strip()[-500:]}")
    (tmp / ".complete").touch()
    shutil.rmtree(tree, ignore_errors=True)
    tmp.rename(tree)
    return tree


# --------------------------------------------------------------------------------------------
# raw corpora


_NOTE = re.compile(r"<note\b.*?</note>", re.S)
_TITLE = re.compile(r"<title\b.*?</title>", re.S)
_TAG = re.compile(r"<[^>]*>")
_CHAPTER = re.compile(r'<chapter\b[^>]*\bsID="([^"]+)"[^>]*/>')
_SPACE = re.compile(r"\s+")


def bible_chapters(tree: Path) -> Iterator[tuple[str, str]]:
    """(osis id, text) per chapter of the World English Bible (SWORD zText module)."""
    base = tree / "usr/share/sword/modules/texts/ztext/engWEB2015eb"
    for part in ("ot", "nt"):
        bzs = (base / f"{part}.bzs").read_bytes()
        bzz = (base / f"{part}.bzz").read_bytes()
        for b in range(len(bzs) // 12):
            off, csize, _ = struct.unpack_from("<III", bzs, b * 12)
            xml = zlib.decompress(bzz[off:off + csize]).decode("utf-8")
            xml = _TITLE.sub(" ", _NOTE.sub(" ", xml))
            pieces = _CHAPTER.split(xml)
            ids = ["intro"] + pieces[1::2]
            for cid, body in zip(ids, pieces[0::2]):
                text = _SPACE.sub(" ", _TAG.sub(" ", body)).strip()
                text = re.sub(r" ([,.;:!?’”)])", r"\1", text)
                text = re.sub(r"([“‘(]) ", r"\1", text)
                if len(text) > 200:
                    yield cid, text


def wordnet_glosses(tree: Path) -> Iterator[tuple[str, str]]:
    """(lemma, 'lemma: gloss') for every synset in WordNet 3.0 (first lemma of the synset)."""
    pos_name = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}
    for pos in ("noun", "verb", "adj", "adv"):
        with open(tree / f"usr/share/wordnet/data.{pos}", encoding="latin-1") as f:
            for line in f:
                if line.startswith("  ") or " | " not in line:
                    continue
                head, gloss = line.split(" | ", 1)
                word = head.split()[4].replace("_", " ")
                yield word, f"{word} ({pos_name[pos]}): {gloss.strip()}"


def wordnet_definition(tree: Path, lemmas: list[str]) -> str:
    """Definition (gloss without examples) of the first noun sense of the first known lemma."""
    index = tree / "usr/share/wordnet/index.noun"
    data = tree / "usr/share/wordnet/data.noun"
    wanted = {l.lower(): n for n, l in enumerate(lemmas)}
    found: dict[int, int] = {}
    with open(index, encoding="latin-1") as f:
        for line in f:
            w = line.split(" ", 1)[0]
            if w in wanted:
                found[wanted[w]] = _first_offset(line)
    if not found:
        raise DataError(f"{index}: none of {lemmas} found")
    with open(data, "rb") as f:
        f.seek(found[min(found)])
        gloss = f.readline().decode("latin-1").split(" | ", 1)[1]
    return gloss.split('; "')[0].strip().rstrip(";")


def _first_offset(index_line: str) -> int:
    parts = index_line.split()
    p_cnt = int(parts[3])
    return int(parts[4 + p_cnt + 2])  # lemma pos synset_cnt p_cnt [ptrs] sense_cnt tagsense_cnt offsets


def idx_images(path: Path) -> np.ndarray:
    raw = gzip.decompress(path.read_bytes())
    if len(raw) < 16 or struct.unpack(">I", raw[:4])[0] != 2051:
        raise DataError(f"{path}: not an IDX image file")
    _, n, h, w = struct.unpack(">IIII", raw[:16])
    if len(raw) != 16 + n * h * w:
        raise DataError(f"{path}: truncated IDX file ({len(raw)} bytes, header says {16 + n * h * w})")
    return np.frombuffer(raw, np.uint8, n * h * w, 16).reshape(n, h, w)


def idx_labels(path: Path) -> np.ndarray:
    raw = gzip.decompress(path.read_bytes())
    if len(raw) < 8 or struct.unpack(">I", raw[:4])[0] != 2049:
        raise DataError(f"{path}: not an IDX label file")
    n = struct.unpack(">I", raw[4:8])[0]
    if len(raw) != 8 + n:
        raise DataError(f"{path}: truncated IDX file ({len(raw)} bytes, header says {8 + n})")
    return np.frombuffer(raw, np.uint8, n, 8)
