"""megavlm.console: the one thing both entry points (megavlm.cli, megavlm.sweep) need, so that
neither imports the other."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "megavlm"


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_sweep_does_not_import_the_cli():
    assert "megavlm.cli" not in _imports(PKG / "sweep.py")
    assert "megavlm.console" in _imports(PKG / "sweep.py") and "megavlm.console" in _imports(PKG / "cli.py")


def test_quiet_libraries_sets_megatron_log_level(monkeypatch):
    from megavlm.console import quiet_libraries

    log = logging.getLogger("megatron")
    monkeypatch.setattr(log, "level", log.level)
    monkeypatch.setenv("MEGAVLM_MEGATRON_LOG_LEVEL", "WARNING")
    quiet_libraries()
    assert log.level == logging.WARNING
