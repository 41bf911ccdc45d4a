"""The kernels' sources live in the top-level ``kernels/`` folder (DESIGN.md's layout) and import as
``megavlm.kernels`` from a plain checkout (megavlm/kernels/__init__.py points there) and from a
wheel (setup.py's ``package_dir`` installs the folder as that package): the wheel is built here,
installed into a temporary ``--target`` and imported in a fresh process that cannot see the
checkout, and the kernels' own tests run against that install."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_sources_are_top_level_and_the_checkout_imports_them():
    assert (ROOT / "kernels" / "masked_ce.py").is_file()
    assert not (ROOT / "megavlm" / "kernels" / "masked_ce.py").exists()  # one copy of the sources
    out = subprocess.run([sys.executable, "-c", "import megavlm.kernels.masked_ce as m, megavlm.kernels as k; "
                          "print(m.__file__); print(k.__doc__.splitlines()[0])"],
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    path, doc = out.stdout.splitlines()
    assert Path(path) == ROOT / "kernels" / "masked_ce.py"
    assert doc.startswith("megavlm.kernels: fused kernels")
    # no regular package named `kernels` at the root: it would shadow PyPI's `kernels` from there
    assert not (ROOT / "kernels" / "__init__.py").exists()


def _source_tree(dest: Path) -> Path:
    """The tracked and untracked-but-not-ignored files of the checkout (what a clone or sdist has)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    return dest


@pytest.mark.slow
def test_wheel_install_has_the_kernels_and_their_tests_pass(tmp_path):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout to list the sources")
    src = _source_tree(tmp_path / "src")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("megavlm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"megavlm/kernels/__init__.py", "megavlm/kernels/masked_ce.py",
            "megavlm/kernels/masked_ce_triton.py"} <= names
    assert not any(n.startswith("kernels/") for n in names)  # no stray top-level package
    init = zipfile.ZipFile(wheel).read("megavlm/kernels/__init__.py").decode()
    assert init == (ROOT / "megavlm" / "kernels" / "__init__.py").read_text()
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    # a process that sees the install and none of the checkout (PYTHONPATH replaced, cwd elsewhere)
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", "import megavlm, megavlm.kernels.masked_ce as m; "
                          "print(megavlm.__file__); print(m.__file__); "
                          "import megavlm.kernels as k; assert k.__doc__.startswith('megavlm.kernels:')"],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    pkg, mod = map(Path, out.stdout.splitlines())
    assert pkg.is_relative_to(target) and mod == target / "megavlm" / "kernels" / "masked_ce.py"
    # the kernels' tests, run from a copy of tests/ beside no megavlm sources, import the wheel's
    shutil.copytree(ROOT / "tests", tmp_path / "t" / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "pytest.ini", tmp_path / "t" / "pytest.ini")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels",
                          "-o", "addopts="], cwd=tmp_path / "t", env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout.splitlines()[-1]


@pytest.mark.slow
def test_editable_install_finds_the_top_level_sources(tmp_path):
    """``pip install -e`` (PEP 660, in a venv that sees this machine's packages) imports
    megavlm.kernels from the checkout's kernels/ folder."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout to list the sources")
    src = _source_tree(tmp_path / "src")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    py = venv / "bin" / "python"
    done = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(src)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    out = subprocess.run([str(py), "-c", "import megavlm, megavlm.kernels.masked_ce as m; "
                          "print(megavlm.__file__); print(m.__file__)"],
                         cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert [Path(p) for p in out.stdout.split()] == [src / "megavlm" / "__init__.py", src / "kernels" / "masked_ce.py"]
