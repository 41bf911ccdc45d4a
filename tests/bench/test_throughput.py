"""The throughput benchmark: what it feeds, how it counts, and one real run through the engine.

Checks that synthetic rows are what the FLOP count assumes (full rows, one causal sequence, P
image positions per caption row), that the timing wrapper attributes waiting to the loader, that
GPU names map to the right peaks, that a case that cannot run here is reported as not run
(never measured as something else), and that a short in-process run yields consistent numbers:
TFLOP/s = tokens/s × FLOPs per token of the rows fed.
"""

from __future__ import annotations

import time

import pytest

from megavlm.bench import throughput as tp
from megavlm.config import load_config
from megavlm.model import flops
from tests import synthetic


def _run(**over):
    raw = synthetic.tiny_run("unused", layers=2)
    return load_config(raw=raw, overrides=[f"{k}={v}" for k, v in over.items()])


def test_gpu_peaks():
    assert tp.gpu_peak("NVIDIA H100 80GB HBM3") == ("H100", {"bf16": 989.4, "fp8": 1978.9})
    assert tp.gpu_peak("NVIDIA H100 PCIe")[0] == "H100 PCIe"
    assert tp.gpu_peak("NVIDIA H200")[1]["bf16"] == 989.4
    assert tp.gpu_peak("NVIDIA A100-SXM4-80GB")[1] == {"bf16": 312.0, "fp8": None}
    assert tp.gpu_peak("Tesla T4") == (None, {})


def test_synthetic_rows_match_the_flop_model():
    run = _run()
    S, P = run.model.seq_length, run.model.vision.num_patches
    text = tp.TimedLoader(tp.SyntheticRows(run, "text", 2, 0), P)
    (b0, b1) = text.next_step()
    assert b0.cu_seqlens is None and b0.image_embeds is None and b0.tokens.shape == (2, S)
    assert text.mixes[0] == flops.RowMix(4 * S, 4 * (S - 1), 0)
    cap = tp.TimedLoader(tp.SyntheticRows(run, "image-text", 2, 0), P)
    batches = cap.next_step()
    assert all(b.cu_seqlens is None for b in batches) and not cap.packed[0]
    mix = cap.mixes[0]
    assert mix.image_positions == 4 * P
    assert mix == flops.RowMix(4 * S, 4 * (S - P - 1), 4 * P)  # loss: SEP .. S-2
    assert mix == flops.RowMix(4 * S, 4 * flops.caption_row_mix(run.model).loss_positions, 4 * P)
    # a pure function of (seed, step, dp rank)
    again = tp.SyntheticRows(run, "image-text", 2, 0).next_step()
    assert (again[1].tokens == batches[1].tokens).all()


def test_timed_loader_attributes_waiting():
    class Slow:
        def next_step(self):
            time.sleep(0.05)
            return tp.SyntheticRows(_run(), "text", 1, 0).next_step()

    ld = tp.TimedLoader(Slow(), 4)
    ld.next_step()
    assert ld.waits[0] >= 0.05 and len(ld.marks) == 1


def test_unavailable_cases_are_reported_not_measured():
    assert tp.unavailable(tp.Case("text", "fp8-delayed", "synthetic"), cuda=True, te=False)
    assert tp.unavailable(tp.Case("text", "bf16", "synthetic"), cuda=False, te=False)
    assert tp.unavailable(tp.Case("text", "fp32", "synthetic"), cuda=False, te=False) is None
    info = {"slug": "cpu", "device": "x", "peaks": {"fp32": 0.1}}
    md = tp.render([tp.Result(tp.Case("text", "fp8-current", "synthetic"), skipped="FP8 needs TE")],
                   _run(), info, "megavlm bench throughput", 1, 2, 1)
    assert "not run: FP8 needs TE" in md


def test_short_run_is_consistent(parallel1):
    run = _run()
    r = tp.run_case(run, tp.Case("image-text", "fp32", "synthetic"), parallel1, steps=2, warmup=1)
    assert r.steps == 2 and r.backend == "local" and not r.document_masks
    assert r.tokens_per_s_per_gpu > 0 and 0 <= r.data_wait_fraction < 1
    P, S = run.model.vision.num_patches, run.model.seq_length
    assert r.image_position_fraction == pytest.approx(P / S)
    per_token = flops.caption_flops_per_token(run.model)
    assert r.tflops_per_gpu * 1e12 == pytest.approx(r.tokens_per_s_per_gpu * per_token, rel=1e-9)
    md = tp.render([r], run, {"slug": "cpu", "device": "x", "peaks": {"fp32": 1.0}}, "cmd", 1, 2, 1)
    assert "| image-text | fp32 | synthetic | local |" in md


def test_packed_rows_carry_several_documents_and_cases_install_no_stop_handlers():
    """The packed case: every row holds DOCUMENTS_PER_ROW documents (boundaries reach the model:
    the varlen path on a GPU); no benchmark case installs stop signals or a time budget, so a
    SIGTERM never makes it write a stop checkpoint."""
    run = _run()
    S = run.model.seq_length
    ld = tp.TimedLoader(tp.SyntheticRows(run, "packed", 2, 0), run.model.vision.num_patches)
    for b in ld.next_step():
        bounds = b.cu_seqlens.tolist()
        rows = b.tokens.shape[0]
        assert bounds[0] == 0 and bounds[-1] == rows * S
        assert len(bounds) - 1 == rows * tp.SyntheticRows.DOCUMENTS_PER_ROW
        assert all(r * S in bounds for r in range(rows + 1))
    assert ld.packed == [True]
    assert tp.SyntheticRows(run, "packed", 2, 0).next_step()[0].tokens.equal(
        tp.SyntheticRows(run, "packed", 2, 0).next_step()[0].tokens)  # a pure function of the step
    for stage in ("text", "packed", "image-text"):
        case = tp.case_config(run, tp.Case(stage, "fp32", "synthetic"), 3, "unused")
        assert case.preemption.stop_signals == [] and case.preemption.max_wall_minutes is None
