"""Running a sweep's jobs: side by side on this machine, or one SLURM job each.

Both executors run the same command per job, ``python -m megavlm.sweep job <sweep_dir> <id>``,
and both skip jobs whose ``job.json`` exists, so a sweep can move between them or be re-run.

Locally, up to ``jobs`` subprocesses run at once, each with ``cores // jobs`` threads (torch's
intra-op pool is set through OMP_NUM_THREADS), started as soon as their dependencies finished.
On SLURM, every unfinished job becomes an sbatch script submitted with ``--dependency=afterok:``
on the jobs it needs (and ``--kill-on-invalid-dep=yes``: when one fails, SLURM cancels the jobs
waiting on it instead of leaving them pending forever); a final job collects results and draws
the plots. Re-submitting skips finished jobs and, for a job of the previous submission that is
still queued or running, waits on that one instead of submitting it twice. :func:`wait_slurm`
follows the jobs to the end and names the failed ones and the ones cancelled because of them.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from megavlm.experiment.plan import Job


class JobFailed(RuntimeError):
    """A sweep job exited with an error (its log file is named)."""


def job_command(sweep_dir: Path, job: Job, python: str = sys.executable) -> list[str]:
    return [python, "-m", "megavlm.sweep", "job", str(Path(sweep_dir).resolve()), job.id]


def job_log(job: Job) -> Path:
    return Path(job.run_dir) / "job.log"


def thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[k] = str(threads)
    return env


def run_local(sweep_dir: Path, jobs: Sequence[Job], parallel_jobs: int = 1, cores: Optional[int] = None,
              on_event: Callable[[str, Job], None] = lambda what, job: None, poll_s: float = 0.5) -> list[str]:
    """Run every unfinished job, at most ``parallel_jobs`` at a time; returns the ids it ran.

    A failing job stops new starts; running ones finish, then :class:`JobFailed` names the log."""
    cores = cores or os.cpu_count() or 1
    threads = max(1, cores // max(1, parallel_jobs))
    pending = [j for j in jobs if not j.done()]
    finished = {j.id for j in jobs if j.done()}
    running: dict[str, tuple[subprocess.Popen, Job, object]] = {}
    ran, failed = [], []
    while pending or running:
        for jid, (proc, job, fh) in list(running.items()):
            if proc.poll() is None:
                continue
            fh.close()
            del running[jid]
            if proc.returncode == 0 and job.done():
                finished.add(jid)
                ran.append(jid)
                on_event("done", job)
            else:
                failed.append(job)
                on_event("failed", job)
        if not failed:
            for job in list(pending):
                if len(running) >= parallel_jobs:
                    break
                if all(d in finished for d in job.deps):
                    pending.remove(job)
                    log = job_log(job)
                    log.parent.mkdir(parents=True, exist_ok=True)
                    fh = log.open("a")
                    proc = subprocess.Popen(job_command(sweep_dir, job), stdout=fh, stderr=subprocess.STDOUT,
                                            env=thread_env(threads))
                    running[job.id] = (proc, job, fh)
                    on_event("start", job)
        elif not running:
            break
        if running:
            time.sleep(poll_s)
        elif pending and not failed:
            raise JobFailed(f"jobs {[j.id for j in pending]} wait on jobs that are not in the plan")
    if failed:
        raise JobFailed("; ".join(f"job {j.id} failed, see {job_log(j)}" for j in failed))
    return ran


# -- SLURM ------------------------------------------------------------------------------------


def sbatch_script(sweep_dir: Path, job: Job, cpus: int, extra: Sequence[str] = ()) -> str:
    """The batch script of one job: its resources, its log, and the job command."""
    name = "megavlm-" + job.id.replace("/", "-")
    lines = ["#!/bin/bash", f"#SBATCH --job-name={name}", f"#SBATCH --output={job_log(job)}",
             "#SBATCH --nodes=1", "#SBATCH --ntasks=1", f"#SBATCH --cpus-per-task={cpus}"]
    lines += [f"#SBATCH {a}" for a in extra]
    lines += ["set -euo pipefail", f"export OMP_NUM_THREADS={cpus}",
              f"cd {shlex.quote(str(Path.cwd()))}",
              " ".join(shlex.quote(c) for c in job_command(sweep_dir, job))]
    return "\n".join(lines) + "\n"


def collect_script(sweep_dir: Path, extra: Sequence[str] = ()) -> str:
    sweep_dir = Path(sweep_dir).resolve()
    lines = ["#!/bin/bash", "#SBATCH --job-name=megavlm-collect", f"#SBATCH --output={sweep_dir / 'collect.log'}",
             "#SBATCH --ntasks=1", "#SBATCH --cpus-per-task=1"]
    lines += [f"#SBATCH {a}" for a in extra]
    lines += ["set -euo pipefail", f"cd {shlex.quote(str(Path.cwd()))}",
              " ".join(shlex.quote(c) for c in [sys.executable, "-m", "megavlm.sweep", "collect", str(sweep_dir)])]
    return "\n".join(lines) + "\n"


def _sbatch(script: Path, deps: Sequence[str], sbatch: str) -> str:
    cmd = [sbatch, "--parsable"]
    if deps:
        cmd += ["--dependency=afterok:" + ":".join(deps), "--kill-on-invalid-dep=yes"]
    cmd.append(str(script))
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise JobFailed(f"{' '.join(cmd)} failed: {res.stderr.strip() or res.stdout.strip()}")
    out = res.stdout.strip().splitlines()
    if not out:
        raise JobFailed(f"{' '.join(cmd)} printed no job id")
    return out[-1].split(";")[0].strip()


def submit_slurm(sweep_dir: Path, jobs: Sequence[Job], cpus: int = 2, extra: Sequence[str] = (),
                 sbatch: str = "sbatch") -> dict[str, str]:
    """Write ``<sweep_dir>/slurm/*.sbatch`` and submit the unfinished jobs in dependency order.

    Returns {job id: SLURM job id} (``collect`` included), also written to ``slurm/submitted.json``."""
    sweep_dir = Path(sweep_dir).resolve()
    folder = sweep_dir / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    ids: dict[str, str] = {}
    earlier = _read_submitted(folder)
    scontrol = str(Path(sbatch).with_name("scontrol")) if os.sep in sbatch else "scontrol"
    for job in jobs:
        if job.done():
            continue
        if job.id in earlier and slurm_state(earlier[job.id], scontrol) in LIVE:
            ids[job.id] = earlier[job.id]  # still queued or running from the last submission
            continue
        Path(job.run_dir).mkdir(parents=True, exist_ok=True)
        script = folder / (job.id.replace("/", "__") + ".sbatch")
        script.write_text(sbatch_script(sweep_dir, job, cpus, extra))
        ids[job.id] = _sbatch(script, [ids[d] for d in job.deps if d in ids], sbatch)
    script = folder / "collect.sbatch"
    script.write_text(collect_script(sweep_dir, extra))
    ids["collect"] = _sbatch(script, [ids[j.id] for j in jobs if j.kind == "cell" and j.id in ids], sbatch)
    (folder / "submitted.json").write_text(json.dumps(ids, indent=1))
    return ids


LIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
        "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING"}
"""SLURM job states of a job that has not ended yet."""


def _read_submitted(folder: Path) -> dict[str, str]:
    f = Path(folder) / "submitted.json"
    try:
        return json.loads(f.read_text()) if f.is_file() else {}
    except (OSError, ValueError):
        return {}


def slurm_state(slurm_id: str, scontrol: str = "scontrol") -> Optional[str]:
    """The job's state and reason as SLURM reports it ("FAILED", "CANCELLED", ...); None once
    SLURM has forgotten the job (MinJobAge after its end) or scontrol cannot answer."""
    try:
        res = subprocess.run([scontrol, "show", "job", "-o", str(slurm_id)], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode != 0:
        return None
    for tok in res.stdout.split():
        if tok.startswith("JobState="):
            return tok.split("=", 1)[1]
    return None


def wait_slurm(sweep_dir: Path, jobs: Sequence[Job], ids: dict[str, str], scontrol: str = "scontrol",
               poll_s: float = 5.0, timeout_s: Optional[float] = None,
               on_event: Callable[[str, str], None] = lambda what, job_id: None) -> dict[str, str]:
    """Follow the submitted jobs until none is queued or running; returns {job id: final state}.

    Raises :class:`JobFailed` naming each failed job (with its log) and the jobs SLURM cancelled
    because a job they need failed."""
    by_id = {j.id: j for j in jobs}
    final: dict[str, str] = {}
    t0 = time.time()
    while True:
        for jid, sid in ids.items():
            if jid in final:
                continue
            state = slurm_state(sid, scontrol)
            if state in LIVE:
                continue
            job = by_id.get(jid)
            if state is None:  # forgotten by SLURM: the job's own marker says whether it finished
                state = "COMPLETED" if job is None or job.done() else "UNKNOWN"
            final[jid] = state
            on_event(state, jid)
        if len(final) == len(ids):
            break
        if timeout_s is not None and time.time() - t0 > timeout_s:
            raise JobFailed(f"SLURM jobs still running after {timeout_s:.0f} s: "
                            f"{', '.join(j for j in ids if j not in final)}")
        time.sleep(poll_s)
    failed = [j for j, s in final.items() if s not in ("COMPLETED", "CANCELLED")]
    cancelled = [j for j, s in final.items() if s == "CANCELLED"]
    if failed or cancelled:
        parts = [f"job {j} {final[j]}" + (f", see {job_log(by_id[j])}" if j in by_id else "") for j in failed]
        if cancelled:
            parts.append("cancelled (a job they need did not finish): " + ", ".join(cancelled))
        raise JobFailed("; ".join(parts))
    return final
