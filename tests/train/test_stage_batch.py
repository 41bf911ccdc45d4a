"""A stage's own global batch (stages.<i>.global_batch_size): plan resolves it once (steps,
tokens per step, microbatches), checkpoints record it, a run folder refuses to resume under
another; and a stage's weight decay follows the stage it starts from unless it sets its own."""

from __future__ import annotations

import json
import math

import pytest

from megavlm.config import ConfigError, load_config, num_microbatches
from megavlm.preflight import config_differences
from megavlm.train.plan import plan_run


def _raw(**sft):
    return {"train": {"micro_batch_size": 4, "global_batch_size": 16},
            "model": {"seq_length": 32},
            "stages": [
                {"name": "text", "tokens": 16 * 32 * 10, "checkpoint_fractions": [1.0]},
                {"name": "sft", "tokens": 16 * 32 * 10, "init": {"stage": "text", "fraction": 1.0},
                 "schedule": {"kind": "rewarm", "peak": 1e-3, "final": 0.0, "warmup_fraction": 0.1},
                 "checkpoint_fractions": [1.0], **sft}]}


def test_stage_batch_sets_steps_tokens_and_microbatches():
    run = load_config(raw=_raw(global_batch_size=8))
    p = plan_run(run)
    assert p["text"].global_batch_size == 16 and p["text"].steps == 10
    # same tokens at half the batch: twice the steps; positions per step halve
    assert p["sft"].global_batch_size == 8 and p["sft"].steps == 20
    assert p["sft"].tokens_per_step == 8 * 32
    assert p["sft"].describe(2)["global_batch_size"] == 8
    assert num_microbatches(run.train, 1, p["sft"].global_batch_size) == 2
    assert num_microbatches(run.train, 1, p["text"].global_batch_size) == 4
    with pytest.raises(ConfigError, match=r"stages.sft.global_batch_size=8 is not divisible by micro_batch_size\*dp = 4\*4"):
        num_microbatches(run.train, 4, 8, where="stages.sft.global_batch_size")


def test_examples_batch_follows_the_stage():
    raw = _raw(global_batch_size=4, epochs=4, batch_unit="examples", epoch_examples=1000)

    class Sized:  # the stage's data: 1000 conversations
        num_examples = 1000
        tokens_per_epoch = 1000 * 32

    p = plan_run(load_config(raw=raw), sizer=lambda st, spec: Sized())
    assert p["sft"].steps == math.ceil(4 * 1000 / 4) == 1000 and not p["sft"].budget.estimated
    assert p["text"].steps == 10


@pytest.mark.parametrize("bad,msg", [(0, "must be a positive integer"), (-8, "must be a positive integer"),
                                     (6, "must be a multiple of train.micro_batch_size=4")])
def test_bad_stage_batch_names_the_key(bad, msg):
    with pytest.raises(ConfigError, match=f"stages.sft.global_batch_size={bad} {msg}"):
        load_config(raw=_raw(global_batch_size=bad))


def test_changed_stage_batch_is_a_config_change():
    old = load_config(raw=_raw(global_batch_size=8)).to_dict()
    new = load_config(raw=_raw(global_batch_size=16)).to_dict()
    assert any("global_batch_size: 8 -> 16" in d for d in config_differences(old, new))
    # a folder recorded before the field existed (no key) is not a change at the default (None)
    legacy = load_config(raw=_raw()).to_dict()
    del legacy["stages"][1]["global_batch_size"]
    assert config_differences(legacy, load_config(raw=_raw()).to_dict()) == []


def test_weight_decay_follows_the_source_stage():
    raw = _raw()
    raw["stages"][0]["weight_decay"] = 0.033
    p = plan_run(load_config(raw=raw))
    assert p["text"].optimizer.weight_decay == 0.033 and p["sft"].optimizer.weight_decay == 0.033
    raw["stages"][1]["weight_decay"] = 0.0  # its own value wins
    assert plan_run(load_config(raw=raw))["sft"].optimizer.weight_decay == 0.0
    fresh = load_config(raw=_raw())  # nothing set anywhere: optimizer.weight_decay
    assert {s.optimizer.weight_decay for s in plan_run(fresh).values()} == {0.1}


# -- the loop: a stage trains at its own batch, records it, and resume refuses another -------------


def _loop_cfg(run_dir, image_batch: int) -> dict:
    from tests import synthetic

    cfg = synthetic.tiny_run(str(run_dir), steps=2, layers=2)  # run batch 8, micro 2, seq 32
    cfg["stages"][1]["global_batch_size"] = image_batch
    cfg["stages"][1]["save_every"] = 1
    return cfg


@pytest.mark.distributed
def test_loop_trains_records_and_refuses_a_changed_stage_batch(tmp_path):
    from tests.dist import launch

    cfg = _loop_cfg(tmp_path / "run", 4)
    launch(1, {"config": cfg, "stop_after": 2}, tmp_path)  # the text stage (2 steps at 8 rows)
    part = launch(1, {"config": cfg, "stop_after": 2}, tmp_path)  # two image steps at 4 rows
    image = [r for r in part["metrics"] if r["stage"] == "image"]
    text = [r for r in part["metrics"] if r["stage"] == "text"]
    assert {r["tokens"] for r in text} == {8 * 32} and len(text) == 2
    # same image token budget (2 x 8 x 32) at half the batch: 4 steps of 4 x 32 positions
    assert len(image) == 2 and {r["tokens"] for r in image} == {4 * 32}
    ck = tmp_path / "run" / "image" / "checkpoints" / "step_0000002"
    meta = json.loads((ck / "meta.json").read_text())
    assert meta["global_batch_size"] == 4 and meta["steps"] == 4 and meta["tokens"] == 2 * 4 * 32
    # another image batch: a config change, refused before anything trains
    bad = launch(1, {"config": _loop_cfg(tmp_path / "run", 8)}, tmp_path, expect_rc=1)
    assert "stages.image.global_batch_size: 4 -> 8" in bad["stderr"]
    # forcing the config past the run-folder check still cannot resume that checkpoint at 8
    forced = launch(1, {"config": _loop_cfg(tmp_path / "run", 8), "force_config": True}, tmp_path, expect_rc=1)
    assert "was trained at global batch 4" in forced["stderr"]
    # (the forced attempt recorded its config: going back to batch 4 is forced too) the batch the
    # checkpoint was trained at resumes it and finishes the stage
    done = launch(1, {"config": cfg, "force_config": True}, tmp_path)
    steps = [r["step"] for r in done["metrics"] if r["stage"] == "image"]
    assert steps == [1, 2, 3, 4]


@pytest.mark.distributed
def test_a_stage_batch_that_does_not_split_fails_before_any_stage_trains(tmp_path):
    from tests.dist import launch

    # 6 rows = 3 micro-batches of 2 on one rank, but not a multiple of 2 x dp 2: the image stage
    # cannot run at dp 2, found before the text stage trains
    res = launch(2, {"config": _loop_cfg(tmp_path / "run", 6)}, tmp_path, expect_rc=1)
    assert "stages.image.global_batch_size=6 is not divisible by micro_batch_size*dp = 2*2" in res["stderr"]
    assert res["metrics"] == []
