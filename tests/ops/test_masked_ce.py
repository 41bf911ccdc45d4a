"""megavlm.ops.masked_ce: the reference (the spec) against torch's cross-entropy; the dispatcher.

The fused kernel's comparisons against the reference (dtypes, tilings, TP=2) and the dispatcher
taking the kernel under the Triton interpreter live in tests/kernels/test_fused_masked_ce.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import megavlm.kernels.masked_ce as fused_module
from megavlm.ops.masked_ce import (ENV_OVERRIDE, masked_cross_entropy,
                                   masked_cross_entropy_reference)


def make_case(shape: tuple[int, ...], d: int, vocab: int, keep: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, d, generator=g)
    weight = torch.randn(vocab, d, generator=g) / d ** 0.5 * 3
    labels = torch.randint(0, vocab, shape, generator=g)
    mask = (torch.rand(shape, generator=g) < keep).float()
    return hidden, weight, labels, mask


def torch_ce(hidden, weight, labels, mask, z_loss: float):
    """Full logits + F.cross_entropy(ignore_index=-100), plus z_loss * lse^2 on the loss rows."""
    logits = (hidden @ weight.t()).reshape(-1, weight.shape[0])
    keep = mask.reshape(-1) > 0
    ce = F.cross_entropy(logits, labels.reshape(-1).masked_fill(~keep, -100), ignore_index=-100,
                         reduction="sum")
    return ce + z_loss * torch.logsumexp(logits[keep], dim=-1).square().sum()


@pytest.mark.parametrize("z_loss", [0.0, 1e-4, 1e-1])
def test_reference_matches_torch_cross_entropy(z_loss):
    hidden, weight, labels, mask = make_case((3, 17), 24, 53, keep=0.3, seed=0)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, count = masked_cross_entropy_reference(h1, w1, labels, mask, z_loss=z_loss)
    loss.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    want = torch_ce(h2, w2, labels, mask, z_loss)
    want.backward()
    assert count.dtype == torch.int64 and count.item() == int(mask.sum().item())
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-6)


def test_reference_all_masked_is_zero_without_nan():
    hidden, weight, labels, _ = make_case((2, 5), 8, 11, keep=0.0, seed=1)
    mask = torch.zeros(2, 5)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, count = masked_cross_entropy_reference(h, w, labels, mask, z_loss=1e-4)
    loss.backward()
    assert loss.item() == 0.0 and count.item() == 0
    assert h.grad.abs().max().item() == 0.0 and w.grad.abs().max().item() == 0.0


def test_reference_bf16_close_to_fp32():
    hidden, weight, labels, mask = make_case((40,), 32, 61, keep=0.5, seed=2)
    loss16, _ = masked_cross_entropy_reference(hidden.bfloat16(), weight.bfloat16(), labels, mask)
    loss32 = torch_ce(hidden.bfloat16().float(), weight.bfloat16().float(), labels, mask, 0.0)
    torch.testing.assert_close(loss16, loss32, rtol=1e-2, atol=0.0)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record whether the dispatcher called the fused kernel; the call still runs for real."""
    calls: list[str] = []
    real = fused_module.masked_linear_cross_entropy

    def recording(*args, **kwargs):
        calls.append("fused")
        return real(*args, **kwargs)

    monkeypatch.setattr(fused_module, "masked_linear_cross_entropy", recording)
    return calls


def test_dispatcher_auto_on_cpu_without_interpreter_uses_reference(monkeypatch, spy):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(ENV_OVERRIDE, raising=False)
    hidden, weight, labels, mask = make_case((9,), 16, 20, keep=0.5, seed=3)
    loss, count = masked_cross_entropy(hidden, weight, labels, mask)
    assert spy == []
    torch.testing.assert_close(loss, torch_ce(hidden, weight, labels, mask, 0.0))


def test_dispatcher_forcing_fused_where_it_cannot_run_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv(ENV_OVERRIDE, "fused")
    hidden, weight, labels, mask = make_case((4,), 16, 8, keep=1.0, seed=4)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        masked_cross_entropy(hidden, weight, labels, mask)


def test_dispatcher_rejects_unknown_override(monkeypatch):
    monkeypatch.setenv(ENV_OVERRIDE, "fast")
    hidden, weight, labels, mask = make_case((4,), 16, 8, keep=1.0, seed=5)
    with pytest.raises(ValueError, match=ENV_OVERRIDE):
        masked_cross_entropy(hidden, weight, labels, mask)


def test_path_is_queryable_and_says_why(monkeypatch):
    from megavlm.ops.masked_ce import masked_ce_path

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(ENV_OVERRIDE, raising=False)
    auto = masked_ce_path("cpu", torch.float32)
    assert (auto.path, auto.requested) == ("reference", "auto")
    assert "TRITON_INTERPRET" in auto.reason
    monkeypatch.setenv(ENV_OVERRIDE, "reference")
    forced = masked_ce_path("cpu", torch.float32)
    assert forced.path == "reference" and ENV_OVERRIDE in forced.reason
    monkeypatch.setenv(ENV_OVERRIDE, "fused")
    with pytest.raises(RuntimeError, match="cannot run"):
        masked_ce_path("cpu", torch.float32)


def test_kernels_import_error_is_an_error_when_forced_and_named_in_auto(monkeypatch):
    """A kernels package that fails to import: ``fused`` raises naming it, ``auto`` says why."""
    import sys

    from megavlm.ops.masked_ce import masked_ce_path

    monkeypatch.setitem(sys.modules, "megavlm.kernels.masked_ce", None)  # import -> ImportError
    monkeypatch.setenv(ENV_OVERRIDE, "fused")
    hidden, weight, labels, mask = make_case((4,), 16, 8, keep=1.0, seed=6)
    with pytest.raises(RuntimeError, match="not importable"):
        masked_cross_entropy(hidden, weight, labels, mask)
    monkeypatch.setenv(ENV_OVERRIDE, "auto")
    choice = masked_ce_path("cpu", torch.float32)
    assert choice.path == "reference" and "not importable" in choice.reason
    loss, _ = masked_cross_entropy(hidden, weight, labels, mask)
    torch.testing.assert_close(loss, torch_ce(hidden, weight, labels, mask, 0.0))


def test_dispatcher_reaches_the_top_level_kernel_sources():
    """The dispatcher's ``megavlm.kernels.masked_ce`` is the top-level kernels/ source in a checkout
    (tests/test_kernels_layout.py builds the wheel and an editable install)."""
    from pathlib import Path

    import megavlm

    repo = Path(megavlm.__file__).resolve().parents[1]
    assert Path(fused_module.__file__).resolve() == repo / "kernels" / "masked_ce.py"
