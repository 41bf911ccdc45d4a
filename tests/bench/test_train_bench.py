"""`megavlm bench train` runs end to end on a few steps and reports both systems' throughput.

Run as a subprocess through the CLI (it owns its own one-process parallel world, and this checks
the `megavlm bench train` wiring), with a smaller model than the recipe so it stays fast.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "launch" / "configs" / "tiny.yaml"


def test_bench_train_smoke(tmp_path):
    cmd = [sys.executable, "-m", "megavlm", "bench", "train", "--steps", "2", "--warmup", "1",
           "--rounds", "2", "--out-dir", str(tmp_path),
           "--set", "model.num_layers=2", "--set", "model.vocab_size=512",
           "--set", "model.seq_length=32", "--set", "model.vision.embed_dim=16"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    m = re.search(r"megavlm (\d+) tokens/s, plain PyTorch (\d+) tokens/s, ratio ([\d.]+)", p.stdout)
    assert m, p.stdout[-3000:]
    mega, plain, ratio = int(m.group(1)), int(m.group(2)), float(m.group(3))
    assert mega > 0 and plain > 0 and abs(ratio - mega / plain) < 0.01
    (path,) = tmp_path.glob("*-cpu-train.md")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d-cpu-train\.md", path.name)
    text = path.read_text()
    assert "Command: `megavlm bench train --steps 2" in text
    assert f"- torch: {torch.__version__}" in text and "- megatron-core: " in text and "- CPU: " in text
    rows = {}
    for system in ("megavlm", "plain"):
        row = re.search(rf"^\| {system} \| (\d+) \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d., ]+ \| [\d.]+ \| "
                        r"([\d.]+) \| ([\d.]+) \|$", text, re.M)
        assert row, f"no measured row for {system}:\n{text}"
        rows[system] = row
    # same weights, same first batch, same loss: the two loops train the same model
    assert abs(float(rows["megavlm"].group(2)) - float(rows["plain"].group(2))) < 1e-4


def test_plain_baseline_trains_the_same_model(parallel1, tmp_path):
    """The two systems the benchmark compares train the same thing: from the same weights, on the
    same batches (half the rows two packed documents), their losses agree step for step — a wrong
    document mask, loss or optimizer setting on the plain side shows up here."""
    from megavlm.bench.train import bench_config, initial_weights, run_megavlm, run_plain

    steps = 3
    run = bench_config(TINY, ["model.num_layers=2", "model.vocab_size=512", "model.seq_length=32",
                              "model.vision.embed_dim=16"], steps, str(tmp_path / "run"))
    _, plain = run_plain(run, initial_weights(run, parallel1), steps)
    _, mega = run_megavlm(run, parallel1, steps)
    assert len(mega) == len(plain) == steps
    assert max(abs(a - b) for a, b in zip(mega, plain)) < 2e-4, (mega, plain)
