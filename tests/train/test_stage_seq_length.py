"""A stage with its own seq_length trains on rows of that length, with steps following from it,
resumes mid-stage to exactly the uninterrupted losses, and trains the same under pipeline
parallel (whose p2p shapes come from the stage's seq_length and the flattened packed layout)."""

from __future__ import annotations

import pytest

from tests import synthetic
from tests.dist import launch, losses

pytestmark = pytest.mark.distributed
IMAGE_SEQ = 16  # the text stage keeps model.seq_length = 32


def _cfg(run_dir, **layout) -> dict:
    cfg = synthetic.tiny_run(str(run_dir), steps=2, layers=2, **layout)
    cfg["stages"][1]["seq_length"] = IMAGE_SEQ
    cfg["stages"][1]["save_every"] = 1
    return cfg


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    d = tmp_path_factory.mktemp("full")
    return launch(1, {"config": _cfg(d / "run")}, d)


def test_stage_seq_length_sets_rows_and_steps(uninterrupted):
    m = uninterrupted["metrics"]
    text = [r for r in m if r["stage"] == "text"]
    image = [r for r in m if r["stage"] == "image"]
    gbs = 8
    assert len(text) == 2 and {r["tokens"] for r in text} == {gbs * 32}
    # same token budget (2 steps at 32 positions), half the row length: twice the steps
    assert len(image) == 4 and {r["tokens"] for r in image} == {gbs * IMAGE_SEQ}
    assert all(r["loss_tokens"] < gbs * IMAGE_SEQ for r in image)


def test_stage_seq_length_resumes_exactly(uninterrupted, tmp_path):
    cfg = _cfg(tmp_path / "run")
    launch(1, {"config": cfg, "stop_after": 2}, tmp_path)  # the text stage, to its end
    part = launch(1, {"config": cfg, "stop_after": 2}, tmp_path)  # two image steps, checkpointed
    assert len(losses(part, "image")) == 2
    ck = sorted(p.name for p in (tmp_path / "run" / "image" / "checkpoints").glob("step_*"))
    assert "step_0000002" in ck
    resumed = launch(1, {"config": cfg}, tmp_path)
    # a restart from step 0 would append steps 1-2 again: the metrics would repeat them
    steps = [(r["stage"], r["step"]) for r in resumed["metrics"]]
    assert len(steps) == len(set(steps)), steps
    assert losses(resumed, "image") == losses(uninterrupted, "image")  # bitwise on CPU


@pytest.mark.slow
def test_stage_seq_length_under_pipeline_parallel(uninterrupted, tmp_path):
    res = launch(2, {"config": _cfg(tmp_path / "run", pp=2)}, tmp_path)
    for stage in ("text", "image"):
        ref, got = losses(uninterrupted, stage), losses(res, stage)
        assert len(ref) == len(got) and max(abs(a - b) for a, b in zip(ref, got)) <= 1e-5, (stage, ref, got)
