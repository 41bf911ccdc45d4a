"""The masked cross-entropy benchmark runs end to end on a tiny CPU case and writes its artifact."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from megavlm.bench.masked_ce import MEMORY_ENV, Shape, loss_fn, main, make_inputs


def test_variants_compute_the_same_loss():
    shape = Shape(batch=2, seq=16, image=11, dim=8, vocab=32, dtype="float32")
    x = make_inputs(shape, "cpu")
    assert int(x["mask"].sum()) == 2 * 5
    naive = loss_fn("naive")(x)
    torch.testing.assert_close(loss_fn("masked_reference")(x), naive)


def test_cpu_case_writes_dated_markdown(tmp_path, capsys):
    assert main(["--case", "cpu", "--batch", "1", "--seq", "64", "--image", "40", "--cpu-dim", "16",
                 "--cpu-vocab", "64", "--repeats", "1", "--out-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*-cpu-masked-ce.md")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d-cpu-masked-ce\.md", path.name)
    text = path.read_text()
    assert "python -m megavlm.bench.masked_ce --case cpu" in text
    assert "- CPU: " in text and f"- torch: {torch.__version__}" in text
    for variant in ("naive", "masked_reference"):
        row = re.search(rf"^\| {variant} \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \|", text,
                        re.M)
        assert row, f"no measured row for {variant}"
    # At this size the masked variant's peak can round to zero pages: its ratio is then "—".
    assert re.search(r"^\| masked_reference \| [\d.]+x \| [\d.]+x \| ([\d.]+x|—) \|$", text,
                     re.M)


def test_gpu_case_without_cuda_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(SystemExit):
        main(["--case", "gpu", "--no-write"])


def test_fused_tiling_variants_parse():
    assert callable(loss_fn("fused")) and callable(loss_fn("fused:64,128,64,4,3"))
    with pytest.raises(ValueError, match="power of two"):
        loss_fn("fused:48,128,64,4,3")
    with pytest.raises(ValueError, match="unknown variant"):
        loss_fn("fast")


def test_peak_rss_sees_a_known_allocation():
    """The CPU peak-memory method, in a fresh process under the benchmark's malloc settings,
    reports a 96 MiB transient tensor (and a freed 64 MiB one before it) as about 96 MiB."""
    code = ("import torch\n"
            "from megavlm.bench.masked_ce import peak_rss_mib\n"
            "def run():\n"
            "    a = torch.ones(16 * 2**20); del a\n"
            "    b = torch.ones(24 * 2**20); del b\n"
            "run()\n"
            "print(peak_rss_mib(run))\n")
    env = dict(os.environ, **MEMORY_ENV)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    assert 90 < float(out.stdout.strip().splitlines()[-1]) < 110
