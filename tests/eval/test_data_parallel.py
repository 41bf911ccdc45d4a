"""Data-parallel evaluation: ``torchrun --nproc_per_node=2 -m megavlm eval vision --suite paper``
over gloo gives the per-question results of one process."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from megavlm.eval import cli
from megavlm.eval.distributed import EvalShards
from tests.dist import ROOT, free_port
from tests.eval.layouts import build_data_root


def test_shards_are_a_deterministic_partition():
    for n in (0, 1, 5, 16):
        for world in (1, 2, 3):
            parts = [EvalShards(r, world).indices(n) for r in range(world)]
            assert sorted(i for p in parts for i in p) == list(range(n))
            assert parts == [EvalShards(r, world).indices(n) for r in range(world)]
    assert EvalShards(1, 2).indices(5) == [1, 3]
    assert EvalShards().gather([0, 1], ["a", "b"], 2) == ["a", "b"]


@pytest.mark.distributed
def test_two_ranks_equal_one_process(encoder_checkpoint, tmp_path, capsys):
    root = build_data_root(tmp_path / "bench")
    args = ["vision", "--checkpoint", str(encoder_checkpoint), "--suite", "paper", "--max-new-tokens", "6",
            "--batch-size", "2"]
    one = tmp_path / "one.json"
    assert cli.main([*args, "--data-root", str(root), "--output-path", str(one)]) == 0, capsys.readouterr().err

    fresh = tmp_path / "bench2"  # no cache: rank 0 encodes while rank 1 waits
    shutil.copytree(root, fresh, ignore=shutil.ignore_patterns(".megavlm-cache"))
    two = tmp_path / "two.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "--master_addr=127.0.0.1", "-m", "megavlm", "eval", *args, "--data-root", str(fresh),
           "--output-path", str(two)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    assert p.stdout.count('"vqav2"') == 1  # rank 0 alone prints the summary

    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert list(a) == list(b)
    assert a.pop("prompt") == b.pop("prompt")  # the prompt template the results were made with
    assert a.pop("checkpoint") == b.pop("checkpoint") == str(encoder_checkpoint.resolve())  # named in every result
    for task in a:
        assert a[task]["n"] == b[task]["n"] and b[task]["data_parallel_ranks"] == 2  # really sharded
        for ra, rb in zip(a[task]["predictions"], b[task]["predictions"], strict=True):
            assert (ra["qid"], ra["prediction"], ra["score"]) == (rb["qid"], rb["prediction"], rb["score"])
            for k in ("logp_yes", "logp_no"):
                if k in ra:
                    assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-4)
        assert b[task]["accuracy"] == pytest.approx(a[task]["accuracy"])
        if "per_split" in a[task]:
            assert b[task]["per_split"] == pytest.approx(a[task]["per_split"])
