#!/usr/bin/env python
"""Build the offline demo corpora (text, captions, conversations + held-out splits) from Debian packages.

    python tools/build_demo_corpora.py --root ~/.cache/megavlm/demo [--full] [--num-patches 16]

Fetches sword-text-web, wordnet-base, dataset-fashion-mnist and tuxpaint-stamps-default with
apt-get download (cached), writes the raw corpora in the standard input formats under ROOT/raw
and prepares them with the same code as the other tools. A second run returns at once.
The same as ``megavlm prepare demo`` (megavlm.prepare).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megavlm.data.indexed import DataError  # noqa: E402
from megavlm.prepare import demo_parser, prepare_demo  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    a = demo_parser("build_demo_corpora.py").parse_args(argv)
    try:
        root = prepare_demo(a.root, a.num_patches, full=a.full, cache=Path(a.cache) if a.cache else None)
    except (DataError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"demo corpora in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
