"""``megavlm bench attention`` at a tiny size: both paths compute the same attention, ``--json``
prints exactly the promised object, the report is written as a dated markdown artifact, and the
workload really has the documents it says."""

from __future__ import annotations

import json
import re

import pytest
import torch

from megavlm.bench.attention import Case, boundaries, build, document_lengths, main

TINY = ["--seq", "64", "--hidden", "64", "--heads", "4", "--docs-per-row", "4", "--repeats", "1"]


def test_documents_per_row():
    case = Case(seq=64, docs_per_row=4, batch=2, hidden=64, heads=4)
    rows = document_lengths(case)
    assert [len(r) for r in rows] == [4, 4] and all(sum(r) == 64 for r in rows)
    assert boundaries(case).tolist()[-1] == 128 and len(boundaries(case)) == 9
    with pytest.raises(ValueError, match="docs-per-row=0"):
        Case(docs_per_row=0)


@pytest.mark.parametrize("part", ["core", "attention"])
def test_paths_compute_the_same_attention(parallel1, part):
    case = Case(seq=48, docs_per_row=3, batch=2, hidden=64, heads=4, part=part)
    dense, packed = (build(case, p, "cpu", torch.float32) for p in ("dense", "packed"))
    a, b = dense(), packed()
    assert a > 0 and abs(a - b) <= 1e-5 * a


def test_json_is_one_object(capsys):
    """Through the CLI's bench subcommand (the workers are subprocesses either way)."""
    from megavlm.cli import main as cli_main

    assert cli_main(["bench", "attention", "--json", *TINY]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    obj = json.loads(line)
    assert set(obj) == {"seq", "docs_per_row", "dense", "packed"}
    assert obj["seq"] == 64 and obj["docs_per_row"] == 4
    for path in ("dense", "packed"):
        assert set(obj[path]) == {"ms", "peak_mib"}
        assert obj[path]["ms"] > 0 and isinstance(obj[path]["peak_mib"], float)


@pytest.mark.slow
def test_report_is_a_dated_artifact(tmp_path, capsys):
    assert main([*TINY, "--out-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*-cpu-attention.md")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d-cpu-attention\.md", path.name)
    text = path.read_text()
    assert "Command: `megavlm bench attention --seq 64" in text and "- CPU: " in text
    for p in ("dense", "packed"):
        assert re.search(rf"^\| {p} \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \|$", text, re.M)
    assert re.search(r"packed vs dense: \*\*[\d.]+x faster\*\*", text)
