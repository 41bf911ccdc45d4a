"""``megavlm sweep`` over a recipe whose image stage imports its text checkpoint (paper-1b.yaml):
the fraction axis maps to imported checkpoints and their place on the source schedule, and the
dry run prints every job with its resolved stage plan — checked here against hand arithmetic of
DCLM-1B's cosine. The slow test runs a small stand-in of that grid end to end from tiny imported
OpenLM checkpoints."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from megavlm.config import load_config
from megavlm.experiment.grid import GridError, default_import_pattern, roles, validate
from megavlm.sweep import main as sweep_main

ROOT = Path(__file__).resolve().parents[1]
PAPER_1B = ROOT / "launch" / "configs" / "paper-1b.yaml"


def dclm_1b_lr(f: float) -> float:
    """DCLM-1B's LR at fraction f of its schedule, by hand (paper Table 2: warmup 5000, peak 1e-2,
    4.3T tokens at 256 x 2048 = 8,201,600 steps; final 1e-5): cosine after the warmup."""
    T, W, peak, final = 8_201_600, 5000, 1e-2, 1e-5
    return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * (f * T - W) / (T - W)))


def _dry_run(tmp_path, capsys, *extra):
    rc = sweep_main(["--config", str(PAPER_1B), "--grid", "fraction=0.2,0.4,0.6,0.8,1.0", "--dry-run",
                     "--out", str(tmp_path / "sw"), *extra])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out


def test_paper_1b_fraction_grid_dry_run_lr_starts(tmp_path, capsys):
    out = _dry_run(tmp_path, capsys)
    assert "5 cells = (text checkpoints imported) 5 image runs + 5 fine-tuning runs" in out
    lines = out.splitlines()
    starts = {}
    for i, line in enumerate(lines):
        m = re.search(r"todo  image/s1234-f([\d.]+)-r0.1-i0  <- -$", line)
        if m:
            detail = lines[i + 1]
            f = float(m.group(1))
            lr0, lr1 = map(float, re.search(r"lr (\S+) -> (\S+)$", detail).groups())
            starts[f] = (detail, lr0, lr1)
    assert sorted(starts) == [0.2, 0.4, 0.6, 0.8, 1.0]
    for f in (0.2, 0.4, 0.6, 0.8):
        detail, lr0, lr1 = starts[f]
        assert f"init data/dclm-1b/imported/dclm-1b-{round(100 * f)}pct;" in detail
        assert f"continue imported source from {f:g}" in detail
        assert lr0 == pytest.approx(dclm_1b_lr(f), rel=1e-5)  # printed to 6 significant digits
        assert lr1 == pytest.approx(1e-5, rel=1e-5)
    # hand values, so a wrong formula cannot pass by agreeing with itself
    assert starts[0.8][1] == pytest.approx(9.65086e-4, rel=1e-5)
    assert starts[0.2][1] == pytest.approx(9.05054e-3, rel=1e-5)
    detail, lr0, lr1 = starts[1.0]  # the finished model, re-warmed to 3e-3 (paper line 149)
    assert "dclm-1b-100pct" in detail and "rewarm peak 0.003" in detail
    assert lr0 == 0.0 and lr1 == pytest.approx(1e-5, rel=1e-3)
    # every cell fine-tunes 4 epochs of 665k examples at the recipe's batch
    assert len(re.findall(r"sft: init image@1; (\d+) steps \(epochs-examples, estimated\)", out)) == 5
    plan = json.loads((tmp_path / "sw" / "plan.json").read_text())
    assert not any(j["kind"] == "text" for j in plan["jobs"])
    img = [j for j in plan["jobs"] if j["id"] == "image/s1234-f0.4-r0.1-i0"][0]
    assert "stages.image.schedule.source.fraction=0.4" in img["overrides"] and img["links"] == {}


def test_import_path_pattern_and_missing_checkpoints(tmp_path, capsys):
    run = load_config(PAPER_1B)
    assert roles(run).imported and default_import_pattern(run) == "data/dclm-1b/imported/dclm-1b-{pct}pct"
    out = _dry_run(tmp_path, capsys, "--import-path", "/ck/dclm-{fraction}")
    assert "init /ck/dclm-0.6;" in out and "init /ck/dclm-1;" in out
    # without --dry-run the checkpoints must be there, checked before anything is prepared
    rc = sweep_main(["--config", str(PAPER_1B), "--grid", "fraction=0.4,0.8", "--out", str(tmp_path / "sw2"),
                     "--import-path", str(tmp_path / "none-{pct}")])
    err = capsys.readouterr().err
    assert rc == 2 and "imported checkpoint(s) missing" in err and "none-40" in err and "none-80" in err
    with pytest.raises(GridError, match="no {pct} or {fraction}"):
        validate(run, {"fraction": [0.4]}, import_pattern="/ck/same")
    with pytest.raises(GridError, match=r"outside \[0, 1\]"):
        validate(run, {"fraction": [1.5]})
    odd = load_config(PAPER_1B, ["stages.image.init.path=/ck/dclm-final"])
    with pytest.raises(GridError, match="--import-path"):
        default_import_pattern(odd)
    with pytest.raises(GridError, match="--import-path"):
        validate(odd, {"fraction": [0.4, 0.8]})
    # sweeping only other variables keeps the recipe's own checkpoint: no pattern needed
    assert validate(odd, {"epochs": [1, 2]})["fraction"] == [0.8]


# -- a small stand-in of the paper-1b grid, end to end ---------------------------------------------


def _standin_recipe(tmp_path: Path) -> Path:
    """paper-1b's shape at toy scale: the tiny recipe's model and demo data, its image stage
    importing a text checkpoint at 50 % of a stated source cosine, then fine-tuning."""
    import yaml

    tiny = yaml.safe_load((ROOT / "launch" / "configs" / "tiny.yaml").read_text())
    raw = {k: tiny[k] for k in ("seed", "parallel", "logging", "data")}
    raw["run_dir"] = str(tmp_path / "run")
    raw["model"] = {**tiny["model"], "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                    "ffn_hidden_size": 128, "seq_length": 64}
    raw["train"] = {"micro_batch_size": 8, "global_batch_size": 8}
    raw["stages"] = [
        {"name": "image", "tokens": 1024, "trainable": "all", "text_attention": "window",
         "init": {"path": str(tmp_path / "imported" / "tiny-50pct")}, "mixture": {"text": 0.85, "captions": 0.15},
         "schedule": {"kind": "continue", "source": {"kind": "cosine", "peak": 3e-3, "final": 1e-5,
                                                     "warmup_steps": 10, "steps": 100, "fraction": 0.5}},
         "checkpoint_fractions": [1.0]},
        {"name": "sft", "tokens": 512, "trainable": "all", "init": {"stage": "image", "fraction": 1.0},
         "mixture": {"text": 0.0, "instructions": 1.0},
         "schedule": {"kind": "rewarm", "peak": 3e-4, "final": 0.0, "warmup_fraction": 0.05},
         "checkpoint_fractions": [1.0]},
    ]
    path = tmp_path / "standin.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.slow
def test_imported_grid_standin_end_to_end(tmp_path, parallel1):
    import sys

    import torch

    from tests.model.test_openlm_import import inv_freq, openlm_state

    sys.path.insert(0, str(ROOT / "tools"))
    import convert_openlm

    recipe = _standin_recipe(tmp_path)
    run = load_config(recipe)
    for seed, pct in ((5, 50), (9, 100)):  # two "released" checkpoints in open_lm's layout, imported
        state = openlm_state(run.model, seed=seed)
        wrapped = {f"module.{k}": v for k, v in state.items()}
        for i in range(run.model.num_layers):
            wrapped[f"module.layers.{i}.attention.pos_embed.inv_freq"] = inv_freq(run.model.head_dim,
                                                                                  run.model.rope_base)
        pt = tmp_path / f"openlm-{pct}.pt"
        torch.save({"epoch": 1, "state_dict": wrapped}, pt)
        convert_openlm.convert(run, parallel1, pt, tmp_path / "imported" / f"tiny-{pct}pct", log=lambda s: None)
    out = tmp_path / "sw"
    args = ["--config", str(recipe), "--grid", "fraction=0.5,1.0", "--out", str(out), "--jobs", "2",
            "--eval-limit", "4"]
    assert sweep_main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["cells_finished"] == 2 == res["cells"]
    for row in res["rows"]:
        assert row["vision_stable"] is not None and row["text_stable"] is not None
    assert not (out / "text").exists()  # nothing re-trains the imported text stage
    for cell in (out / "cells").iterdir():
        assert (cell / "image").is_symlink() and not (cell / "text").exists()
    metas = {}
    for img in (out / "image").iterdir():
        cfg = yaml_load(img / "config.yaml")
        metas[img.name] = cfg["stages"][0]
    assert metas["s1234-f0.5-r0.15-i0"]["init"]["path"].endswith("tiny-50pct")
    assert metas["s1234-f0.5-r0.15-i0"]["schedule"]["kind"] == "continue"
    assert metas["s1234-f1-r0.15-i0"]["init"]["path"].endswith("tiny-100pct")
    assert metas["s1234-f1-r0.15-i0"]["schedule"]["kind"] == "rewarm"
    # the continued branch trained its first step at the source cosine's LR at 50 % (by hand:
    # 1e-5 + (3e-3 - 1e-5) / 2 * (1 + cos(pi * (50 - 10) / (100 - 10))) = 1.76460e-3)
    first = json.loads((out / "image" / "s1234-f0.5-r0.15-i0" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["lr"] == pytest.approx(1.764604e-3, rel=1e-5)


def yaml_load(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def test_imported_grid_on_slurm_has_no_text_jobs(tmp_path, monkeypatch):
    import os

    bindir = tmp_path / "bin"
    bindir.mkdir()
    log, counter = tmp_path / "sbatch.log", tmp_path / "sbatch.count"
    counter.write_text("100")
    (bindir / "sbatch").write_text(f"#!/bin/bash\nn=$(cat {counter}); echo $((n+1)) > {counter}\n"
                                   f'echo "$@" >> {log}\necho "$n;cluster"\n')
    (bindir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    recipe = _standin_recipe(tmp_path)
    for pct in (50, 100):  # present (what the sweep checks before submitting)
        (tmp_path / "imported" / f"tiny-{pct}pct").mkdir(parents=True)
    out = tmp_path / "sw"
    assert sweep_main(["--config", str(recipe), "--grid", "fraction=0.5,1.0", "--grid", "seed=1,2",
                       "--out", str(out), "--slurm"]) == 0
    calls = log.read_text().splitlines()
    ids = json.loads((out / "slurm" / "submitted.json").read_text())
    assert len(calls) == 4 + 4 + 1 and not any(k.startswith("text/") for k in ids)  # images, cells, collect
    image_calls = [c for c in calls if "image__" in c]
    assert len(image_calls) == 4 and not any("--dependency" in c for c in image_calls)
    cell = next(c for c in calls if "cell__s2-f0.5-r0.15-i0-e1" in c)
    assert f"--dependency=afterok:{ids['image/s2-f0.5-r0.15-i0']}" in cell


def test_recorded_fraction_must_match_the_swept_one(tmp_path):
    from megavlm.experiment.grid import missing_imports

    SRC = {"kind": "cosine", "peak": 1e-2, "final": 1e-5, "warmup_steps": 50}
    for pct, step in ((40, 400), (80, 600)):  # checkpoints of ours recording their schedule; 80 % is mislabelled
        ck = tmp_path / f"ck-{pct}pct"
        ck.mkdir()
        (ck / "meta.json").write_text(json.dumps({"stage": "text", "step": step, "steps": 1000, "schedule": SRC}))
    run = load_config(PAPER_1B, ["stages.image.schedule.source=null", f"stages.image.init.path={tmp_path}/ck-80pct"])
    pattern = f"{tmp_path}/ck-{{pct}}pct"
    full = validate(run, {"fraction": [0.4, 0.8]}, import_pattern=pattern)
    problems = missing_imports(run, full, pattern)
    assert problems == [f"{tmp_path}/ck-80pct (its meta.json stands at fraction 0.6, not 0.8)"]
