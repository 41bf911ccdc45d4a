"""Whether progress bars (tqdm) draw: on an interactive terminal yes, in a log file or a batch
job's output no (a bar there is thousands of carriage-return lines). ``MEGAVLM_PROGRESS=1`` or
``=0`` forces either way. Every tqdm in megavlm passes ``disable=not bars_enabled()``."""

from __future__ import annotations

import os
import sys
from typing import Optional, TextIO


def bars_enabled(stream: Optional[TextIO] = None) -> bool:
    forced = os.environ.get("MEGAVLM_PROGRESS", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    s = sys.stderr if stream is None else stream
    return bool(getattr(s, "isatty", lambda: False)())
