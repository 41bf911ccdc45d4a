"""What every benchmark report shares: the machine it ran on and a dated markdown file.

Benchmarks are artifacts: each result is written as ``benchmarks/<date>-<hardware>-<name>.md``
with the command and the machine, so figures can be compared (as ratios) within one file.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from pathlib import Path


def cpu_model(default: str = "unknown") -> str:
    """The CPU's model name from /proc/cpuinfo."""
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        return m.group(1).strip() if m else default
    except OSError:
        return default


def load_average() -> str:
    """The 1/5/15-minute load average, for judging how noisy a run's machine was."""
    return " / ".join(f"{v:.2f}" for v in os.getloadavg())


def write_report(out_dir: str | Path, hardware: str, name: str, text: str) -> Path:
    """Write ``<out_dir>/<today>-<hardware>-<name>.md`` (temporary name, then rename)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{_dt.date.today().isoformat()}-{hardware}-{name}.md"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path
