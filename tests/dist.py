"""Launch a multi-process gloo test through torchrun and collect its results."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, spec: dict, workdir: Path, timeout: int = 300, expect_rc: int = 0) -> dict:
    """Run tests/parallel/dist_worker.py on ``nproc`` processes; return rank 0's results and the
    run's metrics (one dict per step line)."""
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / f"out-{nproc}-{abs(hash(json.dumps(spec, sort_keys=True)))}.pt"
    spec = dict(spec, out=str(out))
    spec_file = workdir / "spec.json"
    spec_file.write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", "--master_addr=127.0.0.1",
           str(ROOT / "tests" / "parallel" / "dist_worker.py"), str(spec_file)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if (p.returncode == 0) != (expect_rc == 0):
        raise AssertionError(f"worker exited {p.returncode} (expected {expect_rc}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    res = torch.load(out) if out.exists() else {}
    metrics_file = Path(spec["config"]["run_dir"]) / "metrics.jsonl"
    res["metrics"] = ([json.loads(l) for l in metrics_file.read_text().splitlines()]
                      if metrics_file.exists() else [])
    res["stdout"], res["stderr"], res["returncode"] = p.stdout, p.stderr, p.returncode
    return res


def losses(res: dict, stage: str) -> list[float]:
    return [m["loss"] for m in res["metrics"] if m["stage"] == stage]


def grad_norms(res: dict, stage: str) -> list[float]:
    return [m["grad_norm"] for m in res["metrics"] if m["stage"] == stage]
