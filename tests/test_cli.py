"""Bad input to ``megavlm train`` ends in one clear error line, not a traceback, and writes
nothing half-finished."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "launch" / "configs" / "tiny.yaml"


def _train(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megavlm", "train", "--config", str(TINY), *overrides],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_missing_data_files_are_one_line_each(tmp_path):
    """Every missing file of every stage, one line each under one error line, then what to run
    (megavlm.preflight); nothing is written."""
    p = _train(f"run_dir={tmp_path / 'run'}", f"data.root={tmp_path / 'nothing'}", "data.build=none")
    assert p.returncode == 2
    err = p.stderr.strip().splitlines()
    assert err[0] == "megavlm: error: 4 problem(s) before training:", p.stderr[-2000:]
    nothing = tmp_path / "nothing"
    for line, name in zip(err[1:5], ("tokenizer.model", "text.idx", "captions.idx", "instructions.idx")):
        assert line.startswith(f"  {nothing / name}: missing"), (line, p.stderr[-2000:])
    assert err[5].startswith("to prepare own data: python tools/train_tokenizer.py") and len(err) == 6
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "run").exists()


def test_start_from_unsaved_checkpoint_is_one_line(tmp_path):
    p = _train(f"run_dir={tmp_path / 'run'}", "--stage", "image")
    assert p.returncode == 2, p.stderr[-3000:]
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "stage 'text' has no checkpoint at fraction 0.8" in err[0], p.stderr[-2000:]


def test_bench_help_is_the_benchmarks_own(capsys):
    """`megavlm bench NAME --help` shows that benchmark's options, not the bench chooser's."""
    from megavlm.cli import main

    with pytest.raises(SystemExit) as e:
        main(["bench", "attention", "--help"])
    assert e.value.code == 0 and "--docs-per-row" in capsys.readouterr().out
