"""megavlm.experiment.executors: the local executor runs jobs after their dependencies, skips
finished ones, stops dependents of a failure, splits threads; SLURM submission chains jobs with
afterok dependencies and reports a failing sbatch."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from megavlm.experiment import executors
from megavlm.experiment.grid import validate
from megavlm.experiment.plan import DONE, build_jobs, read_plan
from megavlm.sweep import main as sweep_main
from tests.experiment.conftest import TINY


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
