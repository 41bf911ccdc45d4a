"""The sweep's SLURM executor (megavlm.experiment.executors) on a real one-node cluster, a 2x2
grid (fraction x epochs: 1 text job, 2 image jobs, 4 cells, collect). The jobs are stand-ins
(each records when it started and ended, sleeps a second and writes its job.json) so the test
is about the executor: SLURM runs them in dependency order; when one fails, SLURM cancels the
jobs that need it and wait_slurm names the failed one and the cancelled ones; re-submitting skips
the finished jobs and runs only the rest, and once more while those still run submits no second
copies."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from megavlm.experiment import executors
from megavlm.experiment.grid import validate
from megavlm.experiment.plan import build_jobs

pytestmark = pytest.mark.slurm

JOB = """
import json, pathlib, sys, time
run_dir, job_id, record, fail = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3], pathlib.Path(sys.argv[4])
open(record, "a").write(f"start {job_id} {time.time()}\\n")
time.sleep(1)
if fail.exists() and fail.read_text().strip() == job_id:
    raise SystemExit(3)
run_dir.mkdir(parents=True, exist_ok=True)
open(record, "a").write(f"end {job_id} {time.time()}\\n")
(run_dir / "job.json").write_text(json.dumps({"job": job_id}))
"""


def _events(record: Path) -> list[tuple[str, str, float]]:
    out = []
    for line in record.read_text().splitlines():
        what, jid, t = line.split()
        out.append((what, jid, float(t)))
    return out


def test_sweep_chain_on_slurm(slurm_cluster, tmp_path, monkeypatch):
    from tests.experiment.conftest import TINY
    from megavlm.config import load_config

    tiny = load_config(TINY)
    jobs = build_jobs(tiny, validate(tiny, {"fraction": [0.8, 1.0], "epochs": [1, 2]}), tmp_path / "sweep")
    assert len(jobs) == 7
    record, fail = tmp_path / "record.txt", tmp_path / "fail"
    monkeypatch.setattr(executors, "job_command", lambda d, j, python=sys.executable:
                        [python, "-c", JOB, j.run_dir, j.id, str(record), str(fail)])
    monkeypatch.setattr(executors, "collect_script", lambda d, extra=(): (
        f"#!/bin/bash\n#SBATCH --output={tmp_path / 'collect.log'}\n"
        f"echo \"start collect $(date +%s.%N)\" >> {record}\n"))
    for k, v in slurm_cluster.env.items():
        monkeypatch.setenv(k, v)
    image08 = next(j for j in jobs if j.kind == "image" and "-f0.8-" in j.id)
    needs_it = sorted(j.id for j in jobs if image08.id in j.deps)
    assert len(needs_it) == 2
    fail.write_text(image08.id)

    ids = executors.submit_slurm(tmp_path / "sweep", jobs, cpus=1)
    assert set(ids) == {j.id for j in jobs} | {"collect"}
    with pytest.raises(executors.JobFailed) as e:
        executors.wait_slurm(tmp_path / "sweep", jobs, ids, poll_s=0.5, timeout_s=300)
    msg = str(e.value)
    assert f"job {image08.id} FAILED, see {Path(image08.run_dir) / 'job.log'}" in msg, msg
    assert "cancelled (a job they need did not finish): " in msg
    cancelled = msg.split("cancelled (a job they need did not finish): ")[1].split(", ")
    assert sorted(cancelled) == sorted(needs_it + ["collect"]), msg
    ev = _events(record)
    started = {jid for what, jid, _ in ev if what == "start"}
    assert started == {j.id for j in jobs} - set(needs_it), ev  # the cancelled ones never started
    ended = {jid: t for what, jid, t in ev if what == "end"}
    begun = {jid: t for what, jid, t in ev if what == "start"}
    for j in jobs:  # dependency order: a job starts only after every job it needs ended
        for d in j.deps if j.id in begun else ():
            assert begun[j.id] >= ended[d], (j.id, d, ev)
    assert not image08.done() and all(j.done() for j in jobs if j.id in ended)

    # re-submitting skips the finished jobs: only the failed one, its dependents and collect run
    fail.unlink()
    record.write_text("")
    again = executors.submit_slurm(tmp_path / "sweep", jobs, cpus=1)
    assert set(again) == {image08.id, *needs_it, "collect"}, again
    # submitting once more while those are queued or running waits on them: no second copies
    third = executors.submit_slurm(tmp_path / "sweep", jobs, cpus=1)
    assert {k: third[k] for k in (image08.id, *needs_it)} == {k: again[k] for k in (image08.id, *needs_it)}
    again["collect 2"] = third["collect"]
    final = executors.wait_slurm(tmp_path / "sweep", jobs, again, poll_s=0.5, timeout_s=300)
    assert set(final.values()) == {"COMPLETED"}, final
    ev = _events(record)
    assert [jid for what, jid, _ in ev if what == "start"][0] == image08.id
    assert sorted(jid for what, jid, _ in ev if what == "start") == sorted([image08.id, *needs_it, "collect",
                                                                            "collect"])  # each once
    assert all(j.done() for j in jobs)
    assert executors.submit_slurm(tmp_path / "sweep", jobs, cpus=1).keys() == {"collect"}  # nothing left
