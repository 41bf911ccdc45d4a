"""What every command-line entry point shares: a readable console.

``megavlm`` (megavlm.cli) and the sweep's job subprocesses (``python -m megavlm.sweep job …``,
which do not start through megavlm.cli) both call :func:`quiet_libraries` first. It lives here,
below both, so neither entry point imports the other.
"""

from __future__ import annotations

import logging
import os
import warnings


def quiet_libraries() -> None:
    """megatron-core announces optional libraries it falls back from; keep the console readable.
    ``MEGAVLM_MEGATRON_LOG_LEVEL`` (default ERROR) sets megatron's logger level."""
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", message=".*absl.logging is not installed.*")
    for category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(torch\.distributed|megatron)(\.|$)")
    level = os.environ.get("MEGAVLM_MEGATRON_LOG_LEVEL", "ERROR")
    logging.getLogger("megatron").setLevel(level)
