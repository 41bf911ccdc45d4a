"""Killing a run and re-running the same command reproduces the uninterrupted run exactly:
killed mid-stage (after a step, past its last checkpoint) and killed mid-checkpoint-write.
The kills are injected by tests/parallel/dist_worker.py (``inject_fault``) on the test side."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests import synthetic
from tests.dist import launch, losses

pytestmark = pytest.mark.distributed


def _cfg(run_dir: Path) -> dict:
    cfg = synthetic.tiny_run(str(run_dir), steps=4, layers=2)
    cfg["stages"][0]["checkpoint_fractions"] = [0.5, 1.0]  # steps 2 and 4
    return cfg


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    d = tmp_path_factory.mktemp("full")
    return launch(1, {"config": _cfg(d / "run")}, d)


@pytest.mark.parametrize("fault", ["exit_after_step:3", "exit_in_checkpoint:4"])
def test_killed_run_resumes_exactly(uninterrupted, tmp_path, fault):
    cfg = _cfg(tmp_path / "run")
    killed = launch(1, {"config": cfg, "fault": fault}, tmp_path, expect_rc=17)
    # our kill, not a crash: torchrun reports the worker's own exit code
    assert re.search(r"exitcode\s*:\s*17\b", killed["stderr"]) or killed["returncode"] == 17, killed["stderr"][-3000:]
    ckdir = tmp_path / "run" / "text" / "checkpoints"
    complete = sorted(p.name for p in ckdir.glob("step_*"))
    assert complete == ["step_0000002"], complete  # step 4's write never completed
    if fault.startswith("exit_in_checkpoint"):
        assert (ckdir / ".tmp-step_0000004").exists()  # the half-written one is visibly partial
    assert len(losses(killed, "text")) == (3 if fault.startswith("exit_after_step") else 4)
    resumed = launch(1, {"config": cfg}, tmp_path)
    assert not (ckdir / ".tmp-step_0000004").exists()
    for stage in ("text", "image"):
        assert losses(resumed, stage) == losses(uninterrupted, stage), (stage, losses(resumed, stage), losses(uninterrupted, stage))  # bitwise on CPU
    steps = [(m["stage"], m["step"]) for m in resumed["metrics"]]
    assert len(steps) == len(set(steps)), "metrics.jsonl repeats steps after resume"
    assert f"[text] resumed from {ckdir / 'step_0000002'} at step 2/4" in resumed["log"], resumed["log"]


def test_finished_run_is_not_retrained(uninterrupted, tmp_path):
    cfg = _cfg(tmp_path / "run")
    launch(1, {"config": cfg}, tmp_path)
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    launch(1, {"config": cfg}, tmp_path)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before
    lines = [json.loads(l) for l in before.splitlines()]
    assert {l["stage"] for l in lines} == {"text", "image"}
    for key in ("stage", "step", "loss", "lr", "tokens", "loss_tokens", "grad_norm", "tokens_per_s"):
        assert key in lines[0]
