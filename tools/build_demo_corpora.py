#!/usr/bin/env python
"""Build the offline demo corpora (text, captions, conversations + held-out splits) from Debian packages.

    python tools/build_demo_corpora.py --root ~/.cache/megavlm/demo [--full] [--num-patches 16]

Fetches sword-text-web, wordnet-base, dataset-fashion-mnist and tuxpaint-stamps-default with
apt-get download (cached), writes the raw corpora in the standard input formats under ROOT/raw
and prepares them with the same code as the other tools. A second run returns at once.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megavlm.config import DataConfig, VisionConfig  # noqa: E402
from megavlm.data.demo import ensure_demo_corpus  # noqa: E402
from megavlm.data.indexed import DataError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=DataConfig.root)
    ap.add_argument("--num-patches", type=int, default=16, help="16 = 128 px, 49 = 224 px")
    ap.add_argument("--full", action="store_true", help="all WordNet glosses and all Fashion-MNIST images")
    ap.add_argument("--cache", default=None, help="where .deb files are kept (default ~/.cache/megavlm/debs)")
    a = ap.parse_args(argv)
    data = DataConfig(root=a.root, build="demo", instructions=["instructions"])
    try:
        ensure_demo_corpus(data, VisionConfig(embed_dim=1280, num_patches=a.num_patches), full=a.full,
                           cache=Path(a.cache) if a.cache else None, progress=True)
    except (DataError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"demo corpora in {Path(a.root).expanduser()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
