"""Shared fixtures. megatron-core keeps its process groups in module globals, so in-process tests
share one single-process parallel context, created on first use and never torn down."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def parallel1():
    from megavlm.config import ParallelConfig
    from megavlm.parallel.state import Parallel

    return Parallel.initialize(ParallelConfig(), seed=1)
