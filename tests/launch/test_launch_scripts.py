"""launch/torchrun.sh and launch/slurm.sbatch start real multi-process training (gloo on CPU).

torchrun.sh: two processes train the tiny recipe's text stage on the cached demo corpus for two
steps at TP=2 with sequence parallelism and full recomputation, all switched on by overrides;
the run must finish, log both steps and write the resolved layout and a checkpoint.
slurm.sbatch (slow): the same through stand-ins for srun/scontrol on PATH, one node.
"""

from __future__ import annotations

import json
import math
import os
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.dist import ROOT

TINY = ROOT / "launch" / "configs" / "tiny.yaml"
OVERRIDES = ["stages.0.tokens=4096", "stages.0.checkpoint_fractions=[0.8,1.0]", "parallel.tp=2",
             "parallel.sequence_parallel=true", "parallel.recompute=full"]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "RANK", "WORLD_", "LOCAL_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _check_run(run_dir: Path, out: str):
    metrics = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2], out[-2000:]
    assert all(m["stage"] == "text" and math.isfinite(m["loss"]) for m in metrics)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["parallel"]["tp"] == 2 and cfg["parallel"]["sequence_parallel"] is True
    assert cfg["parallel"]["recompute"] == "full"
    assert (run_dir / "text" / "checkpoints" / "step_0000002" / "meta.json").is_file()


def test_torchrun_rejects_missing_config():
    p = subprocess.run([str(ROOT / "launch" / "torchrun.sh"), "no/such.yaml"], capture_output=True,
                       text=True, timeout=30, env=_env(NPROC="2"))
    assert p.returncode == 2 and "config file not found" in p.stderr


@pytest.mark.distributed
def test_torchrun_two_processes_tp2_sp_recompute(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [str(ROOT / "launch" / "torchrun.sh"), str(TINY), "--stage", "text", f"run_dir={run_dir}", *OVERRIDES]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=_env(NPROC="2"))
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert "--nproc_per_node=2" in out
    _check_run(run_dir, out)


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.mark.slow
@pytest.mark.distributed
def test_slurm_sbatch_one_node_with_stub_srun(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir / "scontrol", 'echo 127.0.0.1\necho node-b\n')  # first host is the rendezvous
    _stub(bin_dir / "srun", 'while [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    run_dir = tmp_path / "run"
    env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node-[a-b]", SLURM_NNODES="1",
               SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=str(ROOT), GPUS_PER_NODE="2")
    cmd = ["bash", str(ROOT / "launch" / "slurm.sbatch"), str(TINY), "--stage", "text",
           f"run_dir={run_dir}", *OVERRIDES]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=400, env=env)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert "rendezvous 127.0.0.1:" in out
    _check_run(run_dir, out)


# --- stopping and requeueing: the launchers' signal path and exit codes, with a stand-in for the
# python that runs torchrun (it behaves as a preempted run does: on the forwarded signal it writes
# 75 to $MEGAVLM_EXIT_FILE, as rank 0 does, and exits 1, as torchrun does when a worker fails)

FAKE_TORCHRUN = """
echo "$@" > "$ARGS_FILE"
stop() { echo "got $1" > "$SIG_FILE"; echo 75 > "$MEGAVLM_EXIT_FILE"; exit 1; }
trap 'stop USR1' USR1
trap 'stop TERM' TERM
echo started > "$STARTED_FILE"
for i in $(seq 600); do sleep 0.1; done
exit 0
"""


def _start_and_signal(cmd, env, started: Path, sig) -> subprocess.CompletedProcess:
    import signal
    import time

    p = subprocess.Popen(cmd, env=env, cwd=started.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(200):
        if started.exists():
            break
        time.sleep(0.05)
    assert started.exists(), p.communicate(timeout=30)
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def _fake_env(tmp_path, **extra):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    _stub(bin_dir / "fakepython", FAKE_TORCHRUN)
    return bin_dir, _env(PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=str(bin_dir / "fakepython"),
                         ARGS_FILE=str(tmp_path / "args"), SIG_FILE=str(tmp_path / "sig"),
                         STARTED_FILE=str(tmp_path / "started"), **extra)


def test_torchrun_forwards_sigterm_and_exits_75(tmp_path):
    import signal

    _, env = _fake_env(tmp_path, NPROC="2")
    p = _start_and_signal([str(ROOT / "launch" / "torchrun.sh"), str(TINY)], env, tmp_path / "started", signal.SIGTERM)
    assert p.returncode == 75, p.stderr[-2000:]
    assert (tmp_path / "sig").read_text().strip() == "got TERM"  # the stand-in torchrun got it
    args = (tmp_path / "args").read_text()
    assert "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in args and "--shutdown-timeout=240" in args


def test_slurm_sbatch_requeues_a_preempted_run(tmp_path):
    import signal

    bin_dir, env = _fake_env(tmp_path, SLURM_JOB_NODELIST="node-a", SLURM_NNODES="1", SLURM_JOB_ID="4242",
                             SLURM_SUBMIT_DIR=str(ROOT), GPUS_PER_NODE="2",
                             MEGAVLM_EXIT_FILE=str(tmp_path / "exit-code"))
    calls = tmp_path / "scontrol-calls"
    _stub(bin_dir / "scontrol", f'echo "$@" >> {calls}\n[[ "$1" == show ]] && echo 127.0.0.1\nexit 0\n')
    # srun forwards signals to its tasks: the stand-in runs the task as its own child and relays them
    _stub(bin_dir / "srun", 'while [[ "$1" == --* ]]; do shift; done\n"$@" &\nchild=$!\n'
                            'trap \'kill -s USR1 $child\' USR1\ntrap \'kill -s TERM $child\' TERM\n'
                            'while :; do wait $child && rc=0 || rc=$?; kill -0 $child 2>/dev/null || break; done\nexit $rc\n')
    script = (ROOT / "launch" / "slurm.sbatch").read_text()
    assert "#SBATCH --signal=B:USR1@300" in script and "#SBATCH --requeue" in script
    p = _start_and_signal(["bash", str(ROOT / "launch" / "slurm.sbatch"), str(TINY)], env, tmp_path / "started",
                          signal.SIGUSR1)  # SLURM's notice ahead of the time limit, to the batch shell
    assert p.returncode == 0, p.stderr[-2000:]
    assert "requeueing job 4242" in p.stderr
    assert "requeue 4242" in calls.read_text().splitlines()
    assert (tmp_path / "sig").read_text().strip() == "got USR1"  # batch shell -> srun -> torchrun
    assert not (tmp_path / "exit-code").exists()  # consumed, so a later failure is never taken for a stop


def test_slurm_sbatch_does_not_requeue_a_failed_run(tmp_path):
    bin_dir, env = _fake_env(tmp_path, SLURM_JOB_NODELIST="node-a", SLURM_NNODES="1", SLURM_JOB_ID="4243",
                             SLURM_SUBMIT_DIR=str(ROOT), MEGAVLM_EXIT_FILE=str(tmp_path / "exit-code"))
    calls = tmp_path / "scontrol-calls"
    _stub(bin_dir / "scontrol", f'echo "$@" >> {calls}\necho 127.0.0.1\n')
    _stub(bin_dir / "srun", 'exit 3\n')
    p = subprocess.run(["bash", str(ROOT / "launch" / "slurm.sbatch"), str(TINY)], env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 3 and "requeue" not in calls.read_text()


def test_slurm_sbatch_requeues_a_run_signalled_before_it_could_checkpoint(tmp_path):
    """A notice that arrives while the workers still start (python would die of SIGUSR1: no stop
    checkpoint, no exit 75) requeues the job too: it resumes from its last complete checkpoint."""
    import signal

    bin_dir, env = _fake_env(tmp_path, SLURM_JOB_NODELIST="node-a", SLURM_NNODES="1", SLURM_JOB_ID="4244",
                             SLURM_SUBMIT_DIR=str(ROOT), MEGAVLM_EXIT_FILE=str(tmp_path / "exit-code"))
    _stub(bin_dir / "fakepython", 'trap "exit 1" USR1\necho started > "$STARTED_FILE"\n'
                                  'for i in $(seq 600); do sleep 0.1; done\n')
    calls = tmp_path / "scontrol-calls"
    _stub(bin_dir / "scontrol", f'echo "$@" >> {calls}\n[[ "$1" == show ]] && echo 127.0.0.1\nexit 0\n')
    _stub(bin_dir / "srun", 'while [[ "$1" == --* ]]; do shift; done\n"$@" &\nchild=$!\n'
                            'trap \'kill -s USR1 $child\' USR1\n'
                            'while :; do wait $child && rc=0 || rc=$?; kill -0 $child 2>/dev/null || break; done\nexit $rc\n')
    p = _start_and_signal(["bash", str(ROOT / "launch" / "slurm.sbatch"), str(TINY)], env, tmp_path / "started",
                          signal.SIGUSR1)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "without a stop checkpoint: requeueing job 4244" in p.stderr
    assert "requeue 4244" in calls.read_text().splitlines()
