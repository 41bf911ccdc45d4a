"""A stage trains only what it says: a projector-only image-text stage leaves every language-model
weight exactly as its starting checkpoint had it and moves the projector — also when a pipeline
stage holds nothing trainable."""

from __future__ import annotations

import pytest

from tests import synthetic
from tests.dist import launch, losses

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("nproc,layout", [(1, {}), (2, {"pp": 2})], ids=["pp1", "pp2"])
def test_projector_only_stage(tmp_path, nproc, layout):
    cfg = synthetic.tiny_run(str(tmp_path / "run"), steps=2, layers=2, **layout)
    cfg["stages"][1]["trainable"] = "projector"
    res = launch(nproc, {"config": cfg, "weights_of": ["text", "image"]}, tmp_path)
    assert len(losses(res, "image")) == 2
    before, after = res["weights"]["text"], res["weights"]["image"]
    moved = {k for k in before if not (before[k] == after[k]).all()}
    assert moved == {"projector.fc1.weight", "projector.fc1.bias", "projector.fc2.weight", "projector.fc2.bias"}


def test_epochs_set_the_budget(tmp_path):
    cfg = synthetic.tiny_run(str(tmp_path / "run"), steps=2, layers=2)
    cfg["stages"][1].update(tokens=0, epochs=2)  # 2 passes over a 4-step synthetic epoch
    res = launch(1, {"config": cfg}, tmp_path)
    assert len(losses(res, "image")) == 8
