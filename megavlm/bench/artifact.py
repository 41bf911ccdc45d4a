"""What every benchmark report shares: the machine it ran on and a dated markdown file.

Benchmarks are artifacts: each result is written as ``benchmarks/<date>-<hardware>-<name>.md``
with the command and the machine, so figures can be compared (as ratios) within one file. This is
the one place that collects machine information (``machine_info``) and writes the file
(``write_report``); every benchmark of megavlm.bench uses both.
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


def package_version(name: str, default: str = "not installed") -> str:
    """The installed version of distribution ``name`` (``default`` when it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return default


def machine_info(packages: tuple[str, ...] = ("megatron-core",)) -> dict[str, str]:
    """CPU, cores, torch threads, the load average now (take it before the runs: then it is the
    machine's, not ours), python, torch and the versions of ``packages``."""
    import platform

    import torch

    info = {"CPU": cpu_model(), "logical CPUs": str(os.cpu_count()), "torch threads": str(torch.get_num_threads()),
            "load average at start (1/5/15 min)": load_average(),
            "python": platform.python_version(), "torch": torch.__version__}
    info.update({name: package_version(name) for name in packages})
    return info


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
