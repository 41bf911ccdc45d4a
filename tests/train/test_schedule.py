"""The three LR schedules are the formulas of the issue, pure functions of the step."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from megavlm.config import load_config
from megavlm.train.plan import checkpoint_steps, describe_run
from megavlm.train.schedule import continued, cosine, rewarm

ROOT = Path(__file__).resolve().parents[2]


def test_cosine_formula():
    T, W, peak, final = 100, 10, 1e-2, 1e-5
    assert cosine(0, T, W, peak, final) == 0.0
    assert cosine(5, T, W, peak, final) == pytest.approx(peak * 5 / 10)
    assert cosine(W, T, W, peak, final) == pytest.approx(peak)
    assert cosine(T, T, W, peak, final) == pytest.approx(final)
    t = 37
    want = final + (peak - final) * 0.5 * (1 + math.cos(math.pi * (t - W) / (T - W)))
    assert cosine(t, T, W, peak, final) == pytest.approx(want)
    assert cosine(3, 10, 0, 1.0, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.3)))


def test_continue_starts_at_fraction_and_ends_at_final():
    src = lambda t: cosine(t, 1000, 50, 3e-3, 1e-5)  # noqa: E731
    T2, f = 200, 0.8
    assert continued(0, T2, src, 1000, f) == pytest.approx(src(800))
    assert continued(T2 - 1, T2, src, 1000, f) == pytest.approx(1e-5)
    t = 57
    assert continued(t, T2, src, 1000, f) == pytest.approx(src(f * 1000 + (1 - f) * 1000 * t / (T2 - 1)))


def test_rewarm_is_cosine_with_ceil_warmup():
    for t in (0, 3, 10, 99):
        assert rewarm(t, 100, 0.05, 3e-4, 0.0) == cosine(t, 100, 5, 3e-4, 0.0)
    assert rewarm(1, 30, 0.05, 1.0, 0.0) == cosine(1, 30, 2, 1.0, 0.0)  # ceil(1.5) = 2


def _run():
    return load_config(ROOT / "launch" / "configs" / "tiny.yaml")


def test_plan_shape_and_values():
    run = _run()
    p = describe_run(run)
    text, image, sft = p["stages"]
    assert [s["name"] for s in p["stages"]] == ["text", "image", "sft"]
    for s in p["stages"]:
        assert len(s["lr"]) >= 101
        assert s["lr"][0][0] == 0 and s["lr"][-1][0] == s["steps"] - 1
        gaps = {round(b[0] - a[0], 9) for a, b in zip(s["lr"], s["lr"][1:])}
        assert len(gaps) == 1  # evenly spaced
        assert set(s["schedule"]) == {"kind", "peak", "final", "warmup_steps", "source_stage", "source_fraction"}
    assert text["steps"] == 300 and text["checkpoints"] == [[0.2, 60], [0.4, 120], [0.6, 180], [0.8, 240], [1.0, 300]]
    assert image["schedule"] == {"kind": "continue", "peak": None, "final": 1e-5, "warmup_steps": None,
                                 "source_stage": "text", "source_fraction": 0.8}
    src_at_f = cosine(240, 300, 30, 3e-3, 1e-5)
    assert image["lr"][0][1] == pytest.approx(src_at_f)
    assert image["lr"][-1][1] == pytest.approx(1e-5)
    assert sft["schedule"]["kind"] == "rewarm" and sft["schedule"]["warmup_steps"] == math.ceil(0.05 * 50)


def test_checkpoint_steps():
    run = _run()
    assert checkpoint_steps(run.stages[0], 7) == ((0.2, 1), (0.4, 3), (0.6, 4), (0.8, 6), (1.0, 7))


def test_plan_cli_json():
    out = subprocess.run([sys.executable, "-m", "megavlm", "plan", "--config",
                          str(ROOT / "launch" / "configs" / "tiny.yaml"), "stages.1.tokens=409600", "--json"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    p = json.loads(out.stdout)
    assert p["stages"][1]["steps"] == 200
    bad = subprocess.run([sys.executable, "-m", "megavlm", "plan", "--config",
                          str(ROOT / "launch" / "configs" / "tiny.yaml"), "stages.1.tokenz=1"],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "unknown config key 'stages.1.tokenz'" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1  # one clear line, no traceback


def test_num_microbatches_divides_exactly():
    from megavlm.config import ConfigError, TrainConfig
    from megavlm.config import num_microbatches

    t = TrainConfig(micro_batch_size=2, global_batch_size=12)
    assert num_microbatches(t) == 6 and num_microbatches(t, dp=3) == 2
    with pytest.raises(ConfigError, match=r"global_batch_size=12 is not divisible by micro_batch_size\*dp = 2\*4"):
        num_microbatches(t, dp=4)


def test_stage_seq_length_sets_steps_and_plan():
    """stages.<i>.seq_length (default model.seq_length) sets the stage's tokens per step."""
    run = load_config(ROOT / "launch" / "configs" / "tiny.yaml",
                      overrides=["stages.image.seq_length=64", "stages.1.tokens=409600"])
    text, image, sft = describe_run(run)["stages"]
    S, gbs = run.model.seq_length, run.train.global_batch_size
    assert text["seq_length"] == sft["seq_length"] == S != 64
    assert image["seq_length"] == 64
    assert image["tokens_per_step"] == gbs * 64 and text["tokens_per_step"] == gbs * S
    assert image["steps"] == math.ceil(409600 / (gbs * 64))
    same = load_config(ROOT / "launch" / "configs" / "tiny.yaml", overrides=["stages.1.tokens=409600"])
    assert describe_run(same)["stages"][1]["steps"] == 200 != image["steps"]


def test_stage_seq_length_bad_values_name_the_value():
    from megavlm.config import ConfigError

    with pytest.raises(ConfigError, match=r"seq_length=0 must be > 0"):
        load_config(ROOT / "launch" / "configs" / "tiny.yaml", overrides=["stages.image.seq_length=0"])
    sp = ["parallel.tp=2", "parallel.sequence_parallel=true"]
    with pytest.raises(ConfigError, match=r"stages\.image\.seq_length=127 must be a multiple of "
                                          r"parallel\.tp=2 under sequence parallel"):
        load_config(ROOT / "launch" / "configs" / "tiny.yaml", overrides=sp + ["stages.image.seq_length=127"])
    with pytest.raises(ConfigError, match=r"model\.seq_length=255 must be a multiple of parallel\.tp=2"):
        load_config(ROOT / "launch" / "configs" / "tiny.yaml", overrides=sp + ["model.seq_length=255"])
    assert load_config(ROOT / "launch" / "configs" / "tiny.yaml",
                       overrides=sp + ["stages.image.seq_length=128"]).stages[1].seq_length == 128
