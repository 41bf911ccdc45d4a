"""Text readers for the published formats (.jsonl, .jsonl.zst, .jsonl.gz, parquet), built with the
formats' own libraries, through tools/preprocess_text.py; bad input named; the skip policy."""
from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from megavlm.data.indexed import DataError, TokenData
from megavlm.prep.inputs import expand_inputs, my_shards, worker_rank
from megavlm.prep.readers.text import read_documents
from tools import preprocess_text as tool


def _jsonl(docs):
    return "".join(json.dumps({"text": d, "url": "x"}) + "\n" for d in docs).encode()


def write_formats(d, docs):
    """The same documents in four formats, split four ways."""
    q = len(docs) // 4
    (d / "a.jsonl").write_bytes(_jsonl(docs[:q]))
    # DCLM-style: several zstd frames in one file
    c = zstandard.ZstdCompressor()
    half = (q + 2 * q) // 2
    (d / "b.jsonl.zst").write_bytes(c.compress(_jsonl(docs[q:half])) + c.compress(_jsonl(docs[half:2 * q])))
    (d / "c.jsonl.gz").write_bytes(gzip.compress(_jsonl(docs[2 * q:3 * q])))
    pq.write_table(pa.table({"text": docs[3 * q:], "id": list(range(len(docs) - 3 * q))}), d / "d.parquet",
                   row_group_size=7)


def test_every_format_reads_the_same_documents(tmp_path, make_text):
    docs = make_text(40, seed=3)
    write_formats(tmp_path, docs)
    got = [t for p in expand_inputs([str(tmp_path / "*")]) for _, t in read_documents(p)]
    assert got == docs
    where = [w for w, _ in read_documents(tmp_path / "d.parquet")]
    assert where[0].endswith("d.parquet: row 0")


def test_brace_ranges_and_globs(tmp_path):
    for i in range(5):
        (tmp_path / f"shard-{i:05d}.jsonl").write_text('{"text": "a"}\n')
    got = expand_inputs([str(tmp_path / "shard-{00000..00003}.jsonl"), str(tmp_path / "shard-0000[34].jsonl")])
    assert [p.name for p in got] == [f"shard-{i:05d}.jsonl" for i in range(5)]
    with pytest.raises(DataError, match=r"shard-00005\.jsonl: no such file"):
        expand_inputs([str(tmp_path / "shard-{00003..00009}.jsonl")])
    with pytest.raises(DataError, match="matches no file"):
        expand_inputs([str(tmp_path / "*.zst")])


def test_worker_rank_from_torchrun_and_slurm():
    assert worker_rank({}) == (0, 1)
    assert worker_rank({"RANK": "3", "WORLD_SIZE": "8"}) == (3, 8)
    assert worker_rank({"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_MIN": "10",
                        "SLURM_ARRAY_TASK_COUNT": "4"}) == (2, 4)
    with pytest.raises(DataError, match="outside"):
        worker_rank({"RANK": "4", "WORLD_SIZE": "4"})
    shards = [f"s{i}" for i in range(7)]
    slices = [my_shards(shards, r, 3) for r in range(3)]
    assert sorted(i for s in slices for i, _ in s) == list(range(7))


def test_corrupt_zst_frame_is_named_and_nothing_written(tmp_path, sp_model, make_text):
    docs = make_text(30, seed=4)
    c = zstandard.ZstdCompressor()
    good = c.compress(_jsonl(docs[:15]))
    bad = bytearray(c.compress(_jsonl(docs[15:])))
    bad[len(bad) // 2:len(bad) // 2 + 8] = b"\xff" * 8  # damage the second frame's data
    (tmp_path / "x.jsonl.zst").write_bytes(good + bytes(bad))
    with pytest.raises(DataError, match=r"x\.jsonl\.zst: corrupt or truncated jsonl\.zst stream after line \d+"):
        list(read_documents(tmp_path / "x.jsonl.zst"))
    out = tmp_path / "out"
    assert tool.main(["--input", str(tmp_path / "x.jsonl.zst"), "--tokenizer", str(sp_model),
                      "--output", str(out), "--no-progress"]) == 1
    assert not list(tmp_path.glob("out*"))
    # skip policy: the documents before the damage are kept, the problem listed
    assert tool.main(["--input", str(tmp_path / "x.jsonl.zst"), "--tokenizer", str(sp_model),
                      "--output", str(out), "--no-progress", "--bad-input", "skip"]) == 0
    n = len(TokenData(out))
    assert 15 <= n < 30
    rej = [json.loads(x) for x in (tmp_path / "out.rejects.jsonl").read_text().splitlines()]
    assert len(rej) == 1 and "x.jsonl.zst: corrupt" in rej[0]["problem"]


def test_bad_json_line_named_or_skipped(tmp_path, sp_model):
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a cat"}\n{"text": \n{"txt": "x"}\n{"text": "a dog"}\n'))
    with pytest.raises(DataError, match=r"b\.jsonl\.gz:2: not valid JSON"):
        list(read_documents(tmp_path / "b.jsonl.gz"))
    rej = []
    assert [t for _, t in read_documents(tmp_path / "b.jsonl.gz", reject=rej.append)] == ["a cat", "a dog"]
    assert [r.split(": ")[0][-len("b.jsonl.gz:2"):] for r in rej] == ["b.jsonl.gz:2", "b.jsonl.gz:3"]


def test_parquet_column_missing_is_named(tmp_path):
    pq.write_table(pa.table({"content": ["a"]}), tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"p\.parquet: no column 'text' \(columns: content\)"):
        list(read_documents(tmp_path / "p.parquet"))
    assert [t for _, t in read_documents(tmp_path / "p.parquet", "content")] == ["a"]


def test_truncated_gzip_is_named(tmp_path):
    blob = gzip.compress(_jsonl([f"document {i} " * 20 for i in range(200)]))
    (tmp_path / "t.jsonl.gz").write_bytes(blob[:len(blob) // 2])
    with pytest.raises(DataError, match=r"t\.jsonl\.gz: corrupt or truncated jsonl\.gz stream after line \d+ "
                                        r"\(the stream ends inside a compressed frame"):
        list(read_documents(tmp_path / "t.jsonl.gz"))
