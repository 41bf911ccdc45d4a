"""Parallel preparation: one part per input shard, written atomically, joined by ``merge``.

Why: the paper's inputs are thousands of shards (DCLM ``.jsonl.zst``, DataComp-DR tars); one
process on one machine cannot prepare them. The same command runs as N workers (torchrun ranks,
SLURM array tasks; megavlm.prep.inputs); each takes a deterministic slice of the shards and writes
one part per shard under ``<out>.parts/``:

    <out>.parts/job.json              the job (kind, settings, the full input list): all workers agree
    <out>.parts/p000017.{bin,idx}     tokens of input shard 17 (and p000017.embeds.* for images)
    <out>.parts/p000017.rejects.jsonl what the skip policy dropped from that shard (may be empty)
    <out>.parts/p000017.done.json     written LAST (temp name, then rename): the part is complete

A part without its ``done.json`` is never read and is redone by a rerun; a part with it is never
redone, so a killed job resumes where it stopped. ``merge`` checks every part is done and joins
them in shard order into ``<out>.{bin,idx}`` (+ ``<out>.embeds.*``) and ``<out>.rejects.jsonl``:
the result does not depend on the number of workers.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from megavlm.data.indexed import DataError

JOB_FORMAT = "megavlm-parts/1"


def parts_dir(out: str | Path) -> Path:
    return Path(f"{out}.parts")


def part_prefix(out: str | Path, index: int) -> Path:
    return parts_dir(out) / f"p{index:06d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def part_done(prefix: Path) -> bool:
    return Path(f"{prefix}.done.json").is_file()


def write_job(out: str | Path, job: dict[str, Any]) -> None:
    """Record the job; a different job already recorded there is an error (never mix parts)."""
    d = parts_dir(out)
    d.mkdir(parents=True, exist_ok=True)
    job = {"format": JOB_FORMAT, **job}
    p = d / "job.json"
    if p.is_file():
        try:
            have = json.loads(p.read_text())
        except ValueError:
            have = None
        if have is not None and have != json.loads(json.dumps(job)):
            diff = sorted(k for k in set(have) | set(job) if have.get(k) != json.loads(json.dumps(job)).get(k))
            raise DataError(f"{p}: parts of a different job are here (differs in: {', '.join(diff)}); "
                            f"remove {d} or choose another --output")
        if have is not None:
            return
    _write_atomic(p, json.dumps(job, indent=1))


def read_job(out: str | Path) -> dict[str, Any]:
    p = parts_dir(out) / "job.json"
    if not p.is_file():
        raise DataError(f"{p}: missing; no parallel preparation was started for {out}")
    job = json.loads(p.read_text())
    if job.get("format") != JOB_FORMAT:
        raise DataError(f"{p}: not a {JOB_FORMAT} job file")
    return job


@dataclass
class PartsStats:
    done: int = 0
    reused: int = 0
    records: int = 0
    rejected: int = 0
    seconds: float = 0.0
    rejects: list[str] = field(default_factory=list)


def run_parts(out: str | Path, shards: Sequence[tuple[int, Path]],
              make_part: Callable[[Path, Path, Optional[Callable[[str], None]]], int], *,
              skip_bad: bool = False) -> PartsStats:
    """Make the part of each ``(index, shard)`` not yet done. ``make_part(shard, prefix, reject)``
    writes the part's files atomically and returns its record count; ``reject`` is given with the
    skip policy (else a bad input raises, naming the shard and the record, and no part is kept)."""
    st = PartsStats()
    t0 = time.perf_counter()
    for index, shard in shards:
        prefix = part_prefix(out, index)
        if part_done(prefix):
            st.reused += 1
            continue
        rejects: list[str] = []
        n = make_part(shard, prefix, rejects.append if skip_bad else None)
        _write_atomic(Path(f"{prefix}.rejects.jsonl"),
                      "".join(json.dumps({"shard": str(shard), "problem": r}) + "\n" for r in rejects))
        _write_atomic(Path(f"{prefix}.done.json"),
                      json.dumps({"shard": str(shard), "records": n, "rejected": len(rejects)}))
        st.done += 1
        st.records += n
        st.rejected += len(rejects)
        st.rejects += rejects
    st.seconds = time.perf_counter() - t0
    return st


def merge_parts(out: str | Path) -> dict[str, Any]:
    """Join every part of the job at ``<out>.parts`` in shard order into ``<out>``; returns a
    summary. Refuses (naming them) when parts are missing, e.g. a worker still running or killed."""
    from megavlm.data.indexed import EmbeddingWriter, EmbeddingStore, IndexedWriter, open_indexed

    out = Path(out)
    job = read_job(out)
    n = len(job["inputs"])
    prefixes = [part_prefix(out, i) for i in range(n)]
    missing = [f"{job['inputs'][i]} (part {p.name})" for i, p in enumerate(prefixes) if not part_done(p)]
    if missing:
        more = f" … and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise DataError(f"{out}: {len(missing)} of {n} parts not finished: {', '.join(missing[:10])}{more}; "
                        f"run the workers (again) before merging")
    records = rejected = 0
    rej_lines: list[str] = []
    for p in prefixes:
        d = json.loads(Path(f"{p}.done.json").read_text())
        records += d["records"]
        rejected += d["rejected"]
        rej_lines += Path(f"{p}.rejects.jsonl").read_text().splitlines(keepends=True)
    if "embeds" in job.get("outputs", []):
        first = EmbeddingStore(f"{prefixes[0]}.embeds").meta
        with EmbeddingWriter(f"{out}.embeds", encoder=first.encoder, num_patches=first.num_patches,
                             embed_dim=first.embed_dim, dtype=first.dtype, image_size=first.image_size,
                             resize=first.resize, source=first.source) as ew:
            for p in prefixes:
                ew.add_store(f"{p}.embeds")
    if "tokens" in job.get("outputs", []):
        dtype = open_indexed(prefixes[0]).index.dtype
        with IndexedWriter(out, dtype) as tw:
            for p in prefixes:
                tw.add_index(p)
    _write_atomic(Path(f"{out}.rejects.jsonl"), "".join(rej_lines))
    return {"parts": n, "records": records, "rejected": rejected}
