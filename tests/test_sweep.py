"""The ``megavlm sweep`` command end to end: a bad grid is refused before anything runs, and a
small real sweep trains, evaluates, shares prefixes, resumes and writes results and plots.
(The sweep's modules have their own tests under tests/experiment/.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megavlm.sweep import main as sweep_main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "launch" / "configs" / "tiny.yaml"


def test_cli_rejects_bad_grid_before_running(tmp_path, capsys):
    rc = sweep_main(["--config", str(TINY), "--grid", "fraction=0.3", "--out", str(tmp_path / "sw")])
    assert rc == 2
    assert "0.2, 0.4, 0.6, 0.8, 1" in capsys.readouterr().err
    assert not (tmp_path / "sw").exists()


# -- a real (small) sweep -----------------------------------------------------------------------------


SMOKE = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.seq_length=64",
         "train.global_batch_size=8", "train.micro_batch_size=8", "stages.0.tokens=2048", "stages.1.tokens=1024",
         "stages.2.tokens=512"]


@pytest.mark.slow
def test_smoke_sweep_end_to_end(tmp_path):
    out = tmp_path / "sw"
    args = ["--config", str(TINY), "--grid", "fraction=0.8,1.0", "--out", str(out), "--jobs", "2",
            "--eval-limit", "4"] + SMOKE
    assert sweep_main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["cells_finished"] == 2 == res["cells"]
    for row in res["rows"]:
        assert row["vision_stable"] is not None and row["text_stable"] is not None
    assert (out / "results.csv").read_text().startswith("seed,fraction,image_ratio,instruct_ratio,epochs")
    assert (out / "plots" / "sweep_fraction.png").stat().st_size > 1000
    # the text stage was trained once and both branches link it
    assert sorted(p.name for p in (out / "text").iterdir()) == ["s1234"]
    for cell in (out / "cells").iterdir():
        assert (cell / "text").is_symlink() and (cell / "image").is_symlink()
    logs = {c.name: (c / "job.log").read_text() for c in (out / "cells").iterdir()}
    assert sweep_main(args) == 0  # everything finished: no job starts again
    assert {c.name: (c / "job.log").read_text() for c in (out / "cells").iterdir()} == logs


def test_epoch_tokens_is_deprecated_and_ignored(tmp_path, capsys):
    rc = sweep_main(["--config", str(TINY), "--grid", "fraction=0.8", "--out", str(tmp_path / "sw"),
                     "--dry-run", "--epoch-tokens", "512"])
    assert rc == 0
    assert "--epoch-tokens is deprecated and ignored" in capsys.readouterr().err
    plan = json.loads((tmp_path / "sw" / "plan.json").read_text())
    assert "epoch_tokens" not in plan
    assert not any(".tokens=" in o for j in plan["jobs"] for o in j["overrides"])
