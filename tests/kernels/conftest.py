"""Worker processes with a known Triton mode, shared by the kernel tests.

Why separate processes: Triton reads TRITON_INTERPRET when it is *imported* (its own
``@triton.jit`` helpers, such as the combine functions behind ``tl.max`` and ``tl.sum``, are
decorated then). A test process that imported Triton without it (a compile test, megatron-core,
a GPU library) can no longer interpret kernels, one that imported it with it can no longer
compile them, and setting it for the whole session would make every CPU ``masked_cross_entropy``
call elsewhere take the (500x slower) interpreted kernel. Each worker is a fresh spawn-started
Python whose first act is to set or clear the variable; tests send it module-level functions and
tensors and get results back.

Without Triton these tests are collected (their modules import only megavlm.kernels' host side,
which never imports Triton) and skipped with the reason, never failed at collection.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

# The initializer runs in the worker before a test module can be imported there, so it must be
# importable without the test paths: it is the builtin exec, given this source.
_WORKER_SETUP = ("import os, sys\n"
                 "os.environ.pop('TRITON_INTERPRET', None)\n"
                 "if {interpret!r}: os.environ['TRITON_INTERPRET'] = '1'\n"
                 "sys.path[:0] = {paths!r}\n")


def _triton_missing() -> str:
    try:
        found = importlib.util.find_spec("triton") is not None
    except Exception as e:  # a broken install can raise from its __init__ lookup
        return f"triton lookup failed ({type(e).__name__}: {e})"
    return "" if found else "triton is not installed (the `kernels` extra); kernel tests skipped"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _triton_missing()
    if not reason:
        return
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.skip(reason=reason))


def _worker(interpret: bool) -> Iterator[Callable[..., Any]]:
    here = Path(__file__).resolve().parent
    paths = [str(here), str(here.parents[1])]  # this folder (prepend mode) and the rootdir
    pool = ProcessPoolExecutor(
        max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=exec,
        initargs=(_WORKER_SETUP.format(interpret=interpret, paths=paths),))

    def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return pool.submit(fn, *args, **kwargs).result(timeout=600)

    try:
        yield call
    finally:
        pool.shutdown(cancel_futures=True)


@pytest.fixture(scope="session")
def interpreted() -> Iterator[Callable[..., Any]]:
    """``interpreted(fn, *args, **kwargs)`` runs ``fn`` where Triton interprets on the CPU."""
    yield from _worker(interpret=True)


@pytest.fixture(scope="session")
def compiling() -> Iterator[Callable[..., Any]]:
    """``compiling(fn, *args, **kwargs)`` runs ``fn`` where Triton compiles (no interpreter)."""
    yield from _worker(interpret=False)
