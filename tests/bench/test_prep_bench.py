"""`megavlm bench prep --quick`: runs, reports the three measurements, writes the dated artifact."""
from __future__ import annotations

import pytest

from megavlm.bench.prep import main


@pytest.mark.slow  # ~25 s on the shared 2-core machine (BPE training, megatron import, merges)
def test_quick_prep_bench_writes_its_report(tmp_path, capsys):
    assert main(["--quick", "--out-dir", str(tmp_path)]) == 0
    (report,) = tmp_path.glob("*-cpu-prep-quick.md")
    text = report.read_text()
    for needle in ("Command: `megavlm bench prep --quick", "tokens/s per core", "images/s per core",
                   "| float8_e4m3 | 8 | 32 |", "byte-level BPE"):
        assert needle in text, needle
