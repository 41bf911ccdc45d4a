"""Text documents from ``.jsonl``, ``.jsonl.zst`` (DCLM-baseline's shards; zstandard),
``.jsonl.gz``, ``.parquet`` (pyarrow; a ``text`` column by default), plain text, and a LLaVA
``.json`` list of conversations.

JSON records give their ``field``; records without it that are a conversation or a caption (the
files the own-data walk-through feeds the tokenizer and a text set, docs/own-data.md) give their
turns (``<image>`` removed, as training sees them) or their ``caption`` (:func:`record_text`).

``read_documents(path, field, reject)`` yields ``(where, text)``; ``where`` is ``file:line`` (or
``file:row N``). Problems name the file and line. Without ``reject`` every problem raises
``DataError``; with it, a bad line (invalid JSON or UTF-8, no text field) is reported and skipped,
and a broken stream (a corrupt zstd frame, a truncated gzip) is reported and the rest of that file
dropped — the documents before it are kept.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Callable, Iterator, Optional

from megavlm.data.indexed import DataError

Reject = Optional[Callable[[str], None]]


def record_text(rec: object, field: str = "text") -> Optional[str]:
    """The text of one JSON record: its ``field``; else a LLaVA conversation's turns (``<image>``
    removed, as training sees them) or a caption record's ``caption``. None when it has none."""
    if not isinstance(rec, dict):
        return None
    if isinstance(rec.get(field), str):
        return rec[field]
    turns = rec.get("conversations")
    if isinstance(turns, list):
        from megavlm.data.prompt import user_text

        return "\n".join(user_text(t["value"]) for t in turns if isinstance(t, dict) and isinstance(t.get("value"), str))
    if isinstance(rec.get("caption"), str):
        return rec["caption"]
    return None


def _llava_list(path: Path, field: str, reject: Reject) -> Iterator[tuple[str, str]]:
    """The records of a LLaVA ``.json`` list (one JSON array, not a line per record)."""
    from megavlm.prep.conversations import load_llava

    for k, rec in enumerate(load_llava(path), 1):
        text = record_text(rec, field)
        if text is None:
            _problem(f"{path}: record {k}: expected an object with a string field {field!r} "
                     f"or a 'conversations' list", reject)
        elif text.strip():
            yield f"{path}: record {k}", text


def text_format(path: Path) -> str:
    name = path.name.lower()
    for suf, kind in ((".jsonl.zst", "jsonl.zst"), (".json.zst", "jsonl.zst"), (".jsonl.gz", "jsonl.gz"),
                      (".json.gz", "jsonl.gz"), (".jsonl", "jsonl"), (".json", "jsonl"),
                      (".parquet", "parquet")):
        if name.endswith(suf):
            return kind
    return "plain"


def _problem(msg: str, reject: Reject) -> None:
    if reject is None:
        raise DataError(msg)
    reject(msg)


_CHUNK = 1 << 16


def _decompressed(path: Path, kind: str) -> Iterator[bytes]:
    """The decompressed bytes of a file, frame by frame (zstd) or member by member (gzip), in
    pieces: everything before a damaged frame has been yielded when the error is raised."""
    import zstandard

    if kind == "jsonl.zst":
        d = zstandard.ZstdDecompressor()
        new = d.decompressobj
    else:
        new = lambda: zlib.decompressobj(wbits=47)  # noqa: E731 - gzip header, one member
    obj, fed = new(), False
    with open(path, "rb") as f:
        while True:
            data = f.read(_CHUNK)
            if not data:
                break
            while data:
                fed = True
                out = obj.decompress(data)
                if out:
                    yield out
                if obj.eof:
                    data = obj.unused_data
                    obj, fed = new(), False
                else:
                    data = b""
    if fed:
        raise EOFError("the stream ends inside a compressed frame (truncated file)")


def _lines(path: Path, kind: str) -> Iterator[bytes]:
    if kind == "jsonl":
        with open(path, "rb") as f:
            yield from f
        return
    rest = b""
    for piece in _decompressed(path, kind):
        rest += piece
        *full, rest = rest.split(b"\n")
        for line in full:
            yield line + b"\n"
    if rest:
        yield rest


def _stream_errors() -> tuple[type, ...]:
    errs: list[type] = [EOFError, OSError, zlib.error]
    try:
        import zstandard

        errs.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errs)


def read_documents(path: str | Path, field: str = "text", reject: Reject = None) -> Iterator[tuple[str, str]]:
    """Yield (where, text) for each non-empty document of one file (format from its suffix)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    kind = text_format(path)
    if kind == "parquet":
        yield from _parquet(path, field, reject)
        return
    if kind == "plain":
        yield from _plain(path)
        return
    if kind == "jsonl" and path.suffix == ".json":
        with open(path, "rb") as f:
            if f.read(4096).lstrip().startswith(b"["):  # a LLaVA list, not JSON lines
                yield from _llava_list(path, field, reject)
                return
    errs = _stream_errors()
    n = 0
    lines = _lines(path, kind)
    while True:
        try:
            raw = next(lines, None)
        except errs as e:
            _problem(f"{path}: corrupt or truncated {kind} stream after line {n} ({e}); "
                     f"the rest of the file is unreadable", reject)
            return
        if raw is None:
            break
        n += 1
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            _problem(f"{path}:{n}: invalid UTF-8 ({e.reason} at byte {e.start})", reject)
            continue
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            _problem(f"{path}:{n}: not valid JSON ({e.msg})", reject)
            continue
        text = record_text(rec, field)
        if text is None:
            _problem(f"{path}:{n}: expected an object with a string field {field!r} "
                     f"(or a 'conversations' list, or a 'caption')", reject)
            continue
        if text.strip():
            yield f"{path}:{n}", text


def _parquet(path: Path, field: str, reject: Reject) -> Iterator[tuple[str, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    if field not in pf.schema_arrow.names:
        raise DataError(f"{path}: no column {field!r} (columns: {', '.join(pf.schema_arrow.names)})")
    row = 0
    try:
        for batch in pf.iter_batches(columns=[field], batch_size=4096):
            for text in batch.column(0).to_pylist():
                if text is None or not isinstance(text, str):
                    _problem(f"{path}: row {row}: column {field!r} is not a string", reject)
                elif text.strip():
                    yield f"{path}: row {row}", text
                row += 1
    except (pa.ArrowException, OSError) as e:
        _problem(f"{path}: corrupt parquet data after row {row} ({e})", reject)


def _plain(path: Path) -> Iterator[tuple[str, str]]:
    """Documents separated by blank lines."""
    with open(path, "rb") as f:
        para: list[str] = []
        start = 1
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{n}: invalid UTF-8 ({e.reason} at byte {e.start})") from None
            if line.strip():
                if not para:
                    start = n
                para.append(line)
            elif para:
                yield f"{path}:{start}", "".join(para).strip("\n")
                para = []
        if para:
            yield f"{path}:{start}", "".join(para).strip("\n")
