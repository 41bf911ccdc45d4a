"""megavlm sweep: grid validation, prefix sharing, resume, SLURM submission, a smoke sweep."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from megavlm.config import load_config
from megavlm.experiment import executors
from megavlm.experiment.grid import GridError, cell_overrides, cells, parse_grid, validate, Cell
from megavlm.experiment.plan import DONE, build_jobs, count_stage_runs, read_plan, write_plan, link_stages
from megavlm.sweep import main as sweep_main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "launch" / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def tiny():
    return load_config(TINY)


# -- validation -------------------------------------------------------------------------------


def test_unknown_variable_lists_valid_choices(tiny):
    with pytest.raises(GridError) as e:
        validate(tiny, {"fractoin": [0.8]})
    msg = str(e.value)
    assert "fractoin" in msg
    for name in ("fraction", "image_ratio", "instruct_ratio", "epochs", "seed"):
        assert name in msg


@pytest.mark.parametrize("grid, needle", [
    ({"fraction": [0.5]}, "valid: 0.2, 0.4, 0.6, 0.8, 1"),
    ({"image_ratio": [1.5]}, "outside [0, 1]"),
    ({"instruct_ratio": [-0.1]}, "outside [0, 1]"),
    ({"image_ratio": [0.9], "instruct_ratio": [0.2]}, "exceed 1"),
    ({"epochs": [0]}, "epochs=0"),
    ({"seed": [1.5]}, "seed=1.5"),
    ({"fraction": []}, "no values"),
    ({"seed": [1, 1]}, "repeats"),
    ({"image_ratio": ["lots"]}, "not a number"),
])
def test_impossible_values_are_rejected(tiny, grid, needle):
    with pytest.raises(GridError, match=None) as e:
        validate(tiny, grid)
    assert needle in str(e.value)


def test_cli_rejects_bad_grid_before_running(tmp_path, capsys):
    rc = sweep_main(["--config", str(TINY), "--grid", "fraction=0.3", "--out", str(tmp_path / "sw")])
    assert rc == 2
    assert "0.2, 0.4, 0.6, 0.8, 1" in capsys.readouterr().err
    assert not (tmp_path / "sw").exists()


def test_parse_grid_inline_and_file(tmp_path):
    f = tmp_path / "grid.yaml"
    f.write_text("seed: [1, 2]\nepochs: 3\n")
    g = parse_grid(["fraction=0.8,1.0", str(f)])
    assert g == {"fraction": [0.8, 1.0], "seed": [1, 2], "epochs": [3]}
    with pytest.raises(GridError, match="neither"):
        parse_grid(["no-such-file.yaml"])


def test_defaults_come_from_the_recipe(tiny):
    full = validate(tiny, {"seed": [1, 2]})
    assert full["fraction"] == [0.8] and full["image_ratio"] == [0.15] and full["instruct_ratio"] == [0.0]
    assert full["epochs"] == [1] and full["seed"] == [1, 2]


def test_cell_overrides_continue_vs_rewarm(tiny):
    cont = load_config(TINY, cell_overrides(tiny, Cell(3, 0.6, 0.2, 0.1, 1), sft_tokens=4096))
    img = cont.stage("image")
    assert cont.seed == 3 and img.init.fraction == 0.6 and img.schedule.kind == "continue"
    assert (img.mixture.text, img.mixture.captions, img.mixture.instructions) == pytest.approx((0.7, 0.2, 0.1))
    assert cont.stage("sft").tokens == 4096
    base = load_config(TINY, cell_overrides(tiny, Cell(3, 1.0, 0.1, 0.0, 1), rewarm_peak=1e-3))
    sc = base.stage("image").schedule
    assert base.stage("image").init.fraction == 1.0 and sc.kind == "rewarm" and sc.peak == 1e-3
    assert sc.final == tiny.stage("text").schedule.final


# -- prefix sharing ----------------------------------------------------------------------------


def test_prefix_sharing_counts_stage_runs(tiny, tmp_path):
    full = validate(tiny, {"seed": [1, 2], "fraction": [0.8, 1.0], "image_ratio": [0.1, 0.2], "epochs": [1, 2, 3]})
    jobs = build_jobs(tiny, full, tmp_path)
    assert len(cells(full)) == 24
    assert count_stage_runs(jobs) == {"text": 2, "image": 8, "cell": 24}
    by_id = {j.id: j for j in jobs}
    seen = set()
    for j in jobs:  # dependencies come first, and point at the runs whose stages they link
        assert all(d in seen for d in j.deps)
        seen.add(j.id)
        for d in j.deps:
            assert by_id[d].run_dir in j.links.values()
    cell = by_id["cell/s2-f1-r0.2-i0-e3"]
    assert cell.links == {"text": str(tmp_path.resolve() / "text" / "s2"),
                          "image": str(tmp_path.resolve() / "image" / "s2-f1-r0.2-i0")}
    # every epoch count of a branch shares one image run
    assert {by_id[f"cell/s1-f0.8-r0.1-i0-e{e}"].deps[0] for e in (1, 2, 3)} == {"image/s1-f0.8-r0.1-i0"}


def test_links_resolve_shared_checkpoints(tmp_path):
    owner = tmp_path / "text" / "s1"
    (owner / "text" / "checkpoints").mkdir(parents=True)
    cell = tmp_path / "cells" / "c"
    link_stages(cell, {"text": str(owner)})
    link_stages(cell, {"text": str(owner)})  # idempotent
    assert (cell / "text").is_symlink() and (cell / "text" / "checkpoints").is_dir()
    (tmp_path / "other" / "text").mkdir(parents=True)
    with pytest.raises(GridError, match="exists"):
        link_stages(cell, {"text": str(tmp_path / "other")})


def test_changed_recipe_refuses_old_sweep_dir(tiny, tmp_path):
    full = validate(tiny, {})
    jobs = build_jobs(tiny, full, tmp_path)
    write_plan(tmp_path, str(TINY), [], full, jobs, None)
    write_plan(tmp_path, str(TINY), [], full, jobs, None)  # same recipe: fine
    with pytest.raises(GridError, match="different recipe"):
        write_plan(tmp_path, str(TINY), ["stages.0.tokens=4096"], full, jobs, None)


# -- resume / local executor ----------------------------------------------------------------------


def _fake_job_command(record: Path):
    """Each 'job' appends its id to ``record`` and writes its job.json, like a real one."""
    def cmd(sweep_dir, job, python=sys.executable):
        code = ("import json, pathlib, sys; d = pathlib.Path(sys.argv[1]); d.mkdir(parents=True, exist_ok=True);"
                "open(sys.argv[3], 'a').write(sys.argv[2] + '\\n');"
                "(d / 'job.json').write_text(json.dumps({'job': sys.argv[2]}))")
        return [python, "-c", code, job.run_dir, job.id, str(record)]
    return cmd


def test_resume_skips_finished_jobs(tiny, tmp_path, monkeypatch):
    full = validate(tiny, {"seed": [1, 2], "epochs": [1, 2]})
    jobs = build_jobs(tiny, full, tmp_path)
    record = tmp_path / "ran.txt"
    monkeypatch.setattr(executors, "job_command", _fake_job_command(record))
    # seed 1's whole chain finished earlier
    for j in jobs:
        if "s1" in j.id.split("/")[1].split("-")[0]:
            Path(j.run_dir).mkdir(parents=True, exist_ok=True)
            (Path(j.run_dir) / DONE).write_text("{}")
    ran = executors.run_local(tmp_path, jobs, parallel_jobs=2, poll_s=0.05)
    assert sorted(ran) == sorted(j.id for j in jobs if j.id.split("/")[1].startswith("s2"))
    order = record.read_text().split()
    assert order.index("text/s2") < order.index("image/s2-f0.8-r0.15-i0") < order.index("cell/s2-f0.8-r0.15-i0-e2")
    assert executors.run_local(tmp_path, jobs, parallel_jobs=2, poll_s=0.05) == []  # all done now


def test_failed_job_stops_dependents(tiny, tmp_path, monkeypatch):
    jobs = build_jobs(tiny, validate(tiny, {}), tmp_path)
    monkeypatch.setattr(executors, "job_command", lambda d, j, python=sys.executable: [python, "-c", "raise SystemExit(3)"])
    with pytest.raises(executors.JobFailed, match="text/s1234"):
        executors.run_local(tmp_path, jobs, parallel_jobs=2, poll_s=0.05)
    assert not any(j.done() for j in jobs)


def test_thread_split():
    assert executors.thread_env(3)["OMP_NUM_THREADS"] == "3"


# -- SLURM ------------------------------------------------------------------------------------------


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch):
    """An ``sbatch`` on PATH that records its arguments and answers job ids 100, 101, ..."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "sbatch.log"
    counter = tmp_path / "sbatch.count"
    counter.write_text("100")
    script = bindir / "sbatch"
    script.write_text(f"""#!/bin/bash
n=$(cat {counter}); echo $((n+1)) > {counter}
echo "$@" >> {log}
echo "$n;cluster"
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return log


def test_slurm_scripts_and_dependencies(tmp_path, fake_sbatch):
    out = tmp_path / "sw"
    rc = sweep_main(["--config", str(TINY), "--grid", "fraction=0.8,1.0", "--grid", "epochs=1,2", "--out", str(out),
                     "--slurm", "--sbatch-arg=--partition=cpu", "--cpus-per-job", "4"])
    assert rc == 0
    calls = fake_sbatch.read_text().splitlines()
    assert len(calls) == 1 + 2 + 4 + 1  # text, 2 image, 4 cells, collect
    ids = json.loads((out / "slurm" / "submitted.json").read_text())
    assert ids["text/s1234"] == "100"
    assert calls[0].split() == ["--parsable", str(out / "slurm" / "text__s1234.sbatch")]
    assert f"--dependency=afterok:{ids['text/s1234']}" in calls[1]
    cell_call = next(c for c in calls if "cell__s1234-f1-r0.15-i0-e2" in c)
    assert f"--dependency=afterok:{ids['image/s1234-f1-r0.15-i0']}" in cell_call
    assert calls[-1].startswith("--parsable --dependency=afterok:" + ":".join(ids[k] for k in ids if k.startswith("cell/")))
    script = (out / "slurm" / "cell__s1234-f0.8-r0.15-i0-e1.sbatch").read_text()
    assert "#SBATCH --partition=cpu" in script and "#SBATCH --cpus-per-task=4" in script
    assert "-m megavlm.sweep job" in script and "cell/s1234-f0.8-r0.15-i0-e1" in script
    # finished jobs are neither resubmitted nor waited on
    plan = read_plan(out)
    text = next(j for j in plan["jobs"] if j["kind"] == "text")
    (Path(text["run_dir"]) / DONE).write_text("{}")
    fake_sbatch.write_text("")
    assert sweep_main(["--config", str(TINY), "--grid", "fraction=0.8,1.0", "--grid", "epochs=1,2", "--out", str(out),
                       "--slurm", "--sbatch-arg=--partition=cpu", "--cpus-per-job", "4"]) == 0
    calls = fake_sbatch.read_text().splitlines()
    assert len(calls) == 2 + 4 + 1 and not any("text__" in c for c in calls)
    assert "--dependency" not in calls[0]


def test_sbatch_failure_is_reported(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "sbatch").write_text("#!/bin/bash\necho 'sbatch: error: invalid partition' >&2\nexit 1\n")
    (bindir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    rc = sweep_main(["--config", str(TINY), "--out", str(tmp_path / "sw"), "--slurm"])
    assert rc == 2


# -- a real (small) sweep -----------------------------------------------------------------------------


SMOKE = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.seq_length=64",
         "train.global_batch_size=8", "train.micro_batch_size=8", "stages.0.tokens=2048", "stages.1.tokens=1024",
         "stages.2.tokens=512"]


@pytest.mark.slow
def test_smoke_sweep_end_to_end(tmp_path):
    out = tmp_path / "sw"
    args = ["--config", str(TINY), "--grid", "fraction=0.8,1.0", "--out", str(out), "--jobs", "2",
            "--eval-limit", "4", "--epoch-tokens", "512"] + SMOKE
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
