"""`megavlm bench data --quick` measures the real StageLoader on every (sequence, mixture) case in
seconds and writes its dated report through the one artifact writer."""

from __future__ import annotations

import re

import torch

from megavlm.bench import data as bench_data
from megavlm.cli import main as cli_main


def test_quick_run_writes_every_case(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli_main(["bench", "data", "--quick", "--steps", "2", "--work", str(tmp_path / "work"),
                     "--out-dir", str(out)]) == 0
    (path,) = out.glob("*-cpu-data*.md")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d-cpu-data-quick\.md", path.name)
    text = path.read_text()
    assert "Command: `megavlm bench data --quick --steps 2" in text
    assert f"- torch: {torch.__version__}" in text and "- CPU: " in text and "- megatron-core: " in text
    rows = re.findall(r"^\| (text [^|]+) \| (\d+) \| 2 x 2 \| 2 \| (\d+) \| ([\d.]+)% \| [\d.]+ \| [\d.]+ \| "
                      r"([\d,]+) \| ([\d,]+) \| [\d.]+x \|$", text, re.M)
    assert [(m, int(s)) for m, s, *_ in rows] == [(name, seq) for seq in bench_data.QUICK.seqs
                                                  for name, _, _ in bench_data.MIXTURES]
    for name, seq, positions, img, tps, per_core in rows:
        assert int(positions) == 2 * 4 * int(seq)
        assert int(tps.replace(",", "")) > 0 and int(per_core.replace(",", "")) > 0
        # text-only rows hold no image positions; caption mixtures do, more at 50 % than at 10 %
        assert (float(img) == 0) == (name == "text 1.0")
    by = {(m, int(s)): float(i) for m, s, _, i, _, _ in rows}
    assert by[("text 0.5 / captions 0.5", 256)] > by[("text 0.9 / captions 0.1", 256)]


def test_paper_sizes_are_the_papers():
    p = bench_data.PAPER
    assert p.seqs == (1024, 2048) and (p.patches, p.width) == (729, 1152)
    assert [c for _, _, c in bench_data.MIXTURES] == [0.0, 0.1, 0.5]
