"""The sweep's baselines: fraction 0.0 (random init) and 1.0 both re-warm to the paper's peak
3e-3 (keh2025 line 149) unless --rewarm-peak says otherwise; epochs in examples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megavlm.config import load_config
from megavlm.experiment.grid import REWARM_PEAK, Cell, cell_overrides, defaults, validate
from megavlm.experiment.plan import build_jobs, job_config, plan_jobs, read_plan, write_plan
from megavlm.sweep import main as sweep_main
from megavlm.train.plan import describe_run

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "launch" / "configs" / "tiny.yaml"
DCLM1B = ROOT / "launch" / "configs" / "dclm-1b.yaml"


@pytest.fixture(scope="module")
def tiny():
    return load_config(TINY)


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_baselines_rewarm_to_3e3_by_default(tiny, fraction):
    assert REWARM_PEAK == 3e-3
    run = load_config(TINY, cell_overrides(tiny, Cell(1, fraction, 0.1, 0.0, 1)))
    img = run.stage("image")
    assert img.schedule.kind == "rewarm" and img.schedule.peak == 3e-3
    assert img.schedule.final == tiny.stage("text").schedule.final
    assert (img.init.stage is None) == (fraction == 0.0)  # 0 %: fresh weights
    lr = describe_run(run)["stages"][1]["lr"]
    assert lr[0][1] == 0.0 and max(v for _, v in lr) <= 3e-3 + 1e-12
    other = load_config(TINY, cell_overrides(tiny, Cell(1, fraction, 0.1, 0.0, 1), rewarm_peak=5e-4))
    assert other.stage("image").schedule.peak == 5e-4


def test_rewarm_default_differs_from_the_text_peak():
    run = load_config(DCLM1B)
    assert run.stage("text").schedule.peak == 1e-2
    img = load_config(DCLM1B, cell_overrides(run, Cell(1, 1.0, 0.1, 0.0, 4))).stage("image")
    assert img.schedule.peak == 3e-3  # not the 1e-2 text peak (issue item 2)


def test_fraction_zero_is_valid_and_needs_no_text_job(tiny, tmp_path):
    full = validate(tiny, {"fraction": [0.0, 0.8]})
    assert full["fraction"] == [0.0, 0.8]
    jobs = {j.id: j for j in build_jobs(tiny, full, tmp_path)}
    zero = next(j for j in jobs.values() if j.kind == "image" and "-f0-" in j.id)
    assert zero.deps == [] and zero.links == {}
    assert "stages.image.init.stage=null" in zero.overrides


def test_sweep_cli_rewarm_peak_option(tmp_path):
    out = tmp_path / "sw"
    assert sweep_main(["--config", str(TINY), "--grid", "fraction=0.0,1.0", "--out", str(out), "--dry-run",
                       "--rewarm-peak", "1e-3"]) == 0
    for j in plan_jobs(read_plan(out)):
        if j.kind == "image":
            assert "stages.image.schedule.peak=0.001" in j.overrides


def test_epochs_grid_uses_examples(tmp_path):
    run = load_config(DCLM1B)
    assert defaults(run)["epochs"] == [4]  # the recipe's own epoch count
    full = validate(run, {"epochs": [1, 4]})
    jobs = build_jobs(run, full, tmp_path)
    write_plan(tmp_path, str(DCLM1B), [], full, jobs, None)
    p = read_plan(tmp_path)
    for j in plan_jobs(p):
        if j.kind == "cell":
            cfg = job_config(p, j)
            sft = cfg.stage("sft")
            assert sft.epochs == j.cell["epochs"] and sft.batch_unit == "examples"
            steps = describe_run(cfg)["stages"][2]["steps"]
            assert steps == -(-j.cell["epochs"] * 665000 // 256)  # 2598 for 1 epoch, 10391 for 4


def test_a_cell_sets_the_fine_tuning_epochs_not_a_token_count(tmp_path):
    """The sweep used to turn epochs into a stages.<sft>.tokens override through its own epoch sizing
    (at model.seq_length); now a cell sets epochs and the stage plan sizes it from its data."""
    run = load_config(TINY)
    full = validate(run, {"epochs": [2]})
    write_plan(tmp_path, str(TINY), [], full, build_jobs(run, full, tmp_path), None)
    p = read_plan(tmp_path)
    assert "epoch_tokens" not in p
    cell = next(j for j in plan_jobs(p) if j.kind == "cell")
    sft = job_config(p, cell).stage("sft")
    assert sft.epochs == 2 and sft.tokens == run.stage("sft").tokens
    assert not any(".tokens=" in o for o in cell.overrides)
