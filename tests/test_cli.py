"""Bad input to ``megavlm train`` ends in one clear error line, not a traceback, and writes
nothing half-finished."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "launch" / "configs" / "tiny.yaml"


def _train(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megavlm", "train", "--config", str(TINY), *overrides],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_missing_data_file_is_one_line(tmp_path):
    p = _train(f"run_dir={tmp_path / 'run'}", f"data.root={tmp_path / 'nothing'}", "data.build=none")
    assert p.returncode == 2
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("megavlm: error:") and "nothing" in err[0], p.stderr[-2000:]
    assert not list((tmp_path / "run").glob("*/checkpoints/*"))


def test_start_from_unsaved_checkpoint_is_one_line(tmp_path):
    p = _train(f"run_dir={tmp_path / 'run'}", "--stage", "image")
    assert p.returncode == 2, p.stderr[-3000:]
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "stage 'text' has no checkpoint at fraction 0.8" in err[0], p.stderr[-2000:]
