"""``megavlm selftest`` on this CPU: the real checks at small sizes, the report, the exit status.

The end-to-end run is a subprocess (it initialises its own process group, as on a fresh
machine) and takes about 35-45 s here (kernel, masked-CE, throughput with a packed-row case,
checkpoint write + bitwise resume, cached generation); the SIGTERM tests (slow) kill it mid-check; the other tests drive ``main`` and the checks in-process.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megavlm.selftest import checks
from megavlm.selftest.environment import Piece, detect
from megavlm.selftest.kernel_check import compare
from megavlm.selftest.run import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU sizes are tested here")
def test_cpu_selftest_runs_every_check_and_writes_the_report(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MEGAVLM_MASKED_CE")}
    out = subprocess.run([sys.executable, "-m", "megavlm", "selftest", "--out-dir", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (report,) = tmp_path.glob("*-cpu-selftest.md")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d-cpu-selftest\.md", report.name)
    text = report.read_text()
    assert f"- torch: {torch.__version__}" in text and "Size: small" in text
    assert "- masked cross-entropy path: reference on cpu" in text  # and why
    assert "TRITON_INTERPRET" in text
    assert "- attention path: local layer spec" in text
    rows = dict(re.findall(r"^\| ([^|]+?) \| (passed|skipped|failed) \|", text, re.M))
    assert rows == {"masked-CE kernel vs reference": "passed", "TE vs local layer spec": "skipped",
                    "masked-CE benchmark": "passed", "training throughput": "passed",
                    "checkpoint write + resume": "passed", "cached generation": "passed"}
    assert re.search(r"packed fp32 [\d,]+ tok/s", text)  # several documents per row
    assert "bitwise equal" in text and "cached greedy tokens equal" in text
    assert re.search(r"TE vs local layer spec \| skipped .*Transformer Engine is not installed", text)
    assert re.search(r"text fp32 [\d,]+ tok/s, MFU [\d.]+% .*image-text fp32 [\d,]+ tok/s", text)
    # the benchmark and throughput reports it links were written beside it
    assert len(list(tmp_path.glob("*-cpu-selftest-masked-ce.md"))) == 1
    assert len(list(tmp_path.glob("*-cpu-selftest-throughput.md"))) == 1


def test_forced_fused_path_that_cannot_run_is_an_error(monkeypatch, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("the fused kernel can run here")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("MEGAVLM_MASKED_CE", "fused")
    assert main(["--out-dir", str(tmp_path)]) == 2
    assert "MEGAVLM_MASKED_CE=fused but the fused kernel cannot run" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing measured, nothing written


def test_a_wrong_result_makes_the_exit_status_non_zero(monkeypatch, tmp_path):
    monkeypatch.setattr(checks, "masked_ce_kernel",
                        lambda env, size: checks.Check("masked-CE kernel vs reference", "failed",
                                                       "loss 1 vs reference 2"))
    assert main(["--only", "kernel", "--out-dir", str(tmp_path)]) == 1
    (report,) = tmp_path.glob("*-selftest.md")
    assert "FAILED: masked-CE kernel vs reference" in report.read_text()


def test_compare_flags_a_kernel_that_disagrees_with_the_reference():
    good = dict(case=dict(rows=8, dim=4, vocab=5, dtype="float32"), count=3, ref_count=3,
                loss=1.0, ref_loss=1.0, loss_rel=0.0, grad_hidden_rel=1e-7, grad_weight_rel=1e-7,
                finite=True, masked_rows_zero=True)
    assert compare(good) == []
    assert "loss" in compare(dict(good, loss=1.01, loss_rel=0.01))[0]
    assert "grad_weight_rel" in compare(dict(good, grad_weight_rel=0.5))[0]
    assert "count" in compare(dict(good, count=2))[0]
    assert "non-finite" in compare(dict(good, finite=False))[0]


def test_missing_triton_skips_the_kernel_check_and_says_so():
    env = detect()
    env.pieces = dict(env.pieces, Triton=Piece("Triton", None, False))
    c = checks.masked_ce_kernel(env, "small")
    assert c.status == "skipped" and "Triton is not installed" in c.detail


def test_missing_recipe_skips_throughput(tmp_path):
    c = checks.throughput(detect(), "small", tmp_path, tmp_path / "absent.yaml")
    assert c.status == "skipped" and "absent.yaml" in c.detail


def test_unknown_check_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit):
        main(["--only", "kernels", "--out-dir", str(tmp_path)])


def test_environment_names_every_optional_piece():
    env = detect()
    labels = set(env.pieces)
    assert {"Transformer Engine", "apex", "Triton", "megatron-core", "lm-eval", "liger-kernel",
            "cut-cross-entropy"} == labels
    text = "\n".join(env.markdown())
    for label in labels:
        assert f"- {label}: " in text
    assert dataclasses.is_dataclass(env)


@pytest.mark.slow  # ~25 s each here
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU sizes are tested here")
@pytest.mark.parametrize("only, at, delay", [("throughput", "training throughput", 4.0),
                                             ("checkpoint,generation", "checkpoint write + resume", 2.5)])
def test_sigterm_leaves_the_report_and_no_checkpoint(tmp_path, only, at, delay):
    """SIGTERM mid-check: the report of what ran so far, exit 128 + 15, and no checkpoint anywhere
    (neither a trainer's stop checkpoint nor the checkpoint check's own)."""
    import signal
    import time

    tmp, out = tmp_path / "tmp", tmp_path / "out"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MEGAVLM_MASKED_CE")}
    env.update(TMPDIR=str(tmp), PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "megavlm", "selftest", "--size", "small", "--only",
                             only, "--out-dir", str(out)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith(f"[running] {at}"):
                break
        time.sleep(delay)
        assert proc.poll() is None, "".join(seen)[-3000:]
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = "".join(seen) + rest
    assert proc.returncode == 128 + signal.SIGTERM, log[-3000:]
    (report,) = out.glob("*-cpu-selftest.md")
    text = report.read_text()
    assert re.search(rf"\| {re.escape(at)} \| interrupted \| [\d.]+ \| stopped by SIGTERM", text), text
    assert "INTERRUPTED during" in text
    assert list(out.iterdir()) == [report]
    left = [p for p in tmp.rglob("*") if p.name.startswith(("megavlm-", "step_", ".tmp-step", "metrics"))]
    assert left == [], left  # no checkpoint, no stop checkpoint, no run folder
