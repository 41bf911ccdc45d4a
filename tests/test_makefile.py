"""The Makefile's install logic, run for real against a stand-in interpreter.

The stand-in answers ``python -c "import X"`` as the test says (importable or not) and records
every ``python -m pip ...`` instead of running it, so these tests see exactly which packages
``make install`` / ``make install-offline`` would install on a machine that has, or lacks, a
torch, a Triton and megatron-core — without touching this machine's environment.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAKE = shutil.which("make")
pytestmark = pytest.mark.skipif(MAKE is None, reason="make is not installed")

FAKE = """#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then echo "$*" >> "$PIP_LOG"; exit 0; fi
if [ "$1" = "-c" ]; then
  for mod in $MISSING; do
    case "$2" in *"import $mod"*) exit 1;; esac
  done
  case "$2" in *sys.version_info*) exit 1;; esac   # pretend Python 3.12
  echo 9.9; exit 0
fi
exit 0
"""


def make(tmp_path: Path, target: str, missing: str = "", *args: str):
    python = tmp_path / "python3"
    python.write_text(FAKE)
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "pip.log"
    log.write_text("")
    env = dict(os.environ, PIP_LOG=str(log), MISSING=missing)
    out = subprocess.run([MAKE, "-s", "-C", str(ROOT), target, f"PYTHON={python}", *args],
                         env=env, capture_output=True, text=True, timeout=60)
    return out, log.read_text().splitlines()


def test_install_keeps_an_installed_torch_triton_and_megatron(tmp_path):
    out, pip = make(tmp_path, "install")
    assert out.returncode == 0, out.stderr
    assert "keeping torch 9.9" in out.stdout and "keeping triton 9.9" in out.stdout
    assert not [c for c in pip if "torch==" in c or "triton==" in c or "megatron-core==" in c]
    assert pip[-1].startswith("-m pip install -q -e .[dev,kernels")


def test_install_adds_the_pinned_triton_only_where_none_is_importable(tmp_path):
    out, pip = make(tmp_path, "install", "triton megatron.core")
    assert out.returncode == 0, out.stderr
    assert "-m pip install -q triton==3.9.0" in pip
    assert "-m pip install -q --no-deps megatron-core==0.19.2" in pip  # 3.12: no ignore flag
    assert not [c for c in pip if "torch==" in c]


def test_kernels_extra_does_not_pin_triton():
    setup = (ROOT / "setup.py").read_text()
    assert '"kernels": ["triton>=3.0"]' in setup and "triton==" not in setup


def test_offline_installs_from_nothing_but_the_wheel_folder(tmp_path):
    out, pip = make(tmp_path, "install", "megatron.core", "OFFLINE=1", "WHEELS=/wheels")
    assert out.returncode == 0, out.stderr
    assert pip == [
        "-m pip install -q --no-index --find-links /wheels --no-deps megatron-core==0.19.2",
        "-m pip install -q --no-index --no-deps --no-build-isolation -e .",
    ]


def test_offline_without_torch_or_wheels_stops_with_the_reason(tmp_path):
    out, pip = make(tmp_path, "install-offline", "torch")
    assert out.returncode != 0 and "torch is not importable" in out.stderr and pip == []
    out, pip = make(tmp_path, "install-offline", "megatron.core")
    assert out.returncode != 0 and "WHEELS=dir" in out.stderr and pip == []


def test_python_defaults_to_python3_when_only_it_exists(tmp_path):
    (tmp_path / "python3").symlink_to(shutil.which("python3") or "/usr/bin/python3")
    env = dict(os.environ, PATH=str(tmp_path))
    out = subprocess.run([MAKE, "-n", "-C", str(ROOT), "selftest"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"{tmp_path}/python3 -m megavlm selftest" in out.stdout
