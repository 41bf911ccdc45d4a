"""Parallel preparation: N workers (RANK/WORLD_SIZE or a SLURM array) each write the parts of their
slice of the shards; merge joins them. 2 workers + merge == 1 worker; a kill mid-prepare then a
rerun == an uninterrupted run; merge refuses while parts are missing; half-written parts are
never read as complete."""
from __future__ import annotations

import json

import pytest

from megavlm.data.indexed import DataError, TokenData
from megavlm.prep import parts as P
from tests.prep.test_readers_text import write_formats
from tools import preprocess_text as tool


def _files(prefix):
    return {ext: open(f"{prefix}{ext}", "rb").read() for ext in (".bin", ".idx")}


@pytest.fixture
def shards(tmp_path, make_text):
    d = tmp_path / "in"
    d.mkdir()
    write_formats(d, make_text(48, seed=11))
    return str(d / "*")


def _args(shards, sp_model, out, *extra):
    return ["--input", shards, "--tokenizer", str(sp_model), "--output", str(out), "--no-progress", *extra]


def test_two_workers_then_merge_equal_one_worker(tmp_path, shards, sp_model, monkeypatch):
    assert tool.main(_args(shards, sp_model, tmp_path / "one", "--parts")) == 0
    for rank in (1, 0):  # order does not matter
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert tool.main(_args(shards, sp_model, tmp_path / "two")) == 0
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert tool.main(["--merge", "--output", str(tmp_path / "two"), "--input", shards,
                      "--tokenizer", str(sp_model)]) == 0
    assert _files(tmp_path / "one") == _files(tmp_path / "two")
    # and equal to the single-job (non-parts) path
    assert tool.main(_args(shards, sp_model, tmp_path / "plain")) == 0
    assert _files(tmp_path / "one") == _files(tmp_path / "plain")
    assert len(TokenData(tmp_path / "one")) == 48


def test_slurm_array_slices(tmp_path, shards, sp_model, monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")  # rank 1 of 3: shard 1 of 4
    assert tool.main(_args(shards, sp_model, tmp_path / "s")) == 0
    done = sorted(p.name for p in (tmp_path / "s.parts").glob("*.done.json"))
    assert done == ["p000001.done.json"]
    with pytest.raises(DataError, match=r"3 of 4 parts not finished: .*a\.jsonl \(part p000000\)"):
        P.merge_parts(tmp_path / "s")


def test_kill_mid_prepare_then_rerun_equals_uninterrupted(tmp_path, shards, sp_model, monkeypatch):
    assert tool.main(_args(shards, sp_model, tmp_path / "ref", "--parts")) == 0
    from megavlm.prep import textparts

    real = textparts.tokenize_part
    calls = []

    def dying(shard, prefix, reject, **kw):
        calls.append(shard.name)
        if len(calls) == 3:  # killed while writing the third part: its temp files stay behind
            from megavlm.data.indexed import IndexedWriter
            w = IndexedWriter(prefix, "uint16")
            w.add([1, 2, 3])
            raise KeyboardInterrupt
        return real(shard, prefix, reject, **kw)

    monkeypatch.setattr(textparts, "tokenize_part", dying)
    with pytest.raises(KeyboardInterrupt):
        tool.main(_args(shards, sp_model, tmp_path / "k", "--parts"))
    d = tmp_path / "k.parts"
    assert sorted(p.name for p in d.glob("*.done.json")) == ["p000000.done.json", "p000001.done.json"]
    assert not (d / "p000002.idx").exists()  # the half-written part exists only under a temp name
    assert not (tmp_path / "k.bin").exists()
    with pytest.raises(DataError, match="2 of 4 parts not finished"):
        P.merge_parts(tmp_path / "k")
    monkeypatch.setattr(textparts, "tokenize_part", real)
    redone = []
    monkeypatch.setattr(textparts, "tokenize_part", lambda s, p, r, **kw: redone.append(s.name) or real(s, p, r, **kw))
    assert tool.main(_args(shards, sp_model, tmp_path / "k", "--parts")) == 0
    assert redone == ["c.jsonl.gz", "d.parquet"]  # finished parts are never redone
    assert _files(tmp_path / "ref") == _files(tmp_path / "k")


def test_a_different_job_in_the_same_folder_is_refused(tmp_path, shards, sp_model):
    assert tool.main(_args(shards, sp_model, tmp_path / "o", "--parts")) == 0
    assert tool.main(_args(shards, sp_model, tmp_path / "o", "--parts", "--field", "body")) == 1
    job = json.loads((tmp_path / "o.parts" / "job.json").read_text())
    assert job["field"] == "text"
