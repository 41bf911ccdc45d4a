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
