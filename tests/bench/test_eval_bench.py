"""``megavlm bench eval`` at a tiny size: cached and uncached generation are timed in one run, give
the same tokens, and the dated report carries the command and one row per (new tokens, batch)."""

from __future__ import annotations

import re

import pytest

from megavlm.cli import main as cli_main

TINY = ["--size", "tiny", "--new-tokens", "2,3", "--batch-sizes", "1,2", "--repeats", "1"]


def test_generation_report(tmp_path, capsys):
    assert cli_main(["bench", "eval", *TINY, "--out", str(tmp_path)]) == 0
    (report,) = tmp_path.glob("*-cpu-eval-generation.md")
    text = report.read_text()
    assert "python -m megavlm.bench.eval --size tiny --new-tokens 2,3 --batch-sizes 1,2 --repeats 1" in text
    assert "random init" in text and "2 layers, d_model 64" in text
    rows = re.findall(r"^\| (\d+) \| (\d+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \|.*\| ([\d.]+)x \| (\w+) \|$", text, re.M)
    assert [(int(n), int(b)) for n, b, *_ in rows] == [(2, 1), (2, 2), (3, 1), (3, 2)]
    for n, b, generated, cached, uncached, ratio, same in rows:
        assert same == "yes"
        assert 0 < int(generated) <= int(n) * int(b)
        assert float(cached) > 0 and float(uncached) > 0
        # the ratio is printed to 0.1 and the times to 0.1 ms: compare within that rounding
        assert float(ratio) == pytest.approx(float(uncached) / float(cached), rel=0.1, abs=0.06)
    assert text in capsys.readouterr().out


def test_bad_arguments_are_named():
    from megavlm.bench.eval import main

    with pytest.raises(SystemExit):
        main(["--new-tokens", "0"])
    with pytest.raises(SystemExit):
        main(["--repeats", "0", "--size", "tiny"])
    with pytest.raises(SystemExit):
        main(["--suites"])  # the suites need a checkpoint
