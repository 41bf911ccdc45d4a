"""Shared by the experiment tests: the tiny recipe (its path and loaded config)."""

from __future__ import annotations

from pathlib import Path

import pytest

from megavlm.config import load_config

TINY = Path(__file__).resolve().parents[2] / "launch" / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def tiny():
    return load_config(TINY)
