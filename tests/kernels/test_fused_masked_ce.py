"""Fused masked linear cross-entropy (megavlm.kernels.masked_ce) against the reference (the spec).

On CPU the kernels run under the Triton interpreter in the worker process of the ``interpreted``
fixture (tests/kernels/conftest.py says why); the reference and torch's cross-entropy run here.
Shapes are tiny and tiles 16 wide, so every case still walks several row, vocabulary and
hidden-dimension blocks and, in the backward, several vocabulary chunks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import megavlm.kernels.masked_ce as fused_module
from megavlm.ops.masked_ce import (ENV_OVERRIDE, masked_cross_entropy,
                                   masked_cross_entropy_reference)
from megavlm.kernels.masked_ce import TileConfig, masked_linear_cross_entropy, supports

SMALL = TileConfig(block_n=16, block_v=16, block_d=16, chunk_bytes=16 * 48 * 4)
"""Vocabulary chunks of 48 columns for 16 fp32 rows: the backward loop runs more than once."""


def make_case(n: int, d: int, vocab: int, keep: float, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(dtype)
    weight = (torch.randn(vocab, d, generator=g) / d ** 0.5 * 3).to(dtype)
    labels = torch.randint(0, vocab, (n,), generator=g)
    mask = torch.rand(n, generator=g) < keep
    return hidden, weight, labels, mask


def run(fn, hidden, weight, labels, mask, **kw):
    """loss, count, grad_hidden, grad_weight of one forward + backward."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss, count = fn(h, w, labels, mask, **kw)
    loss.backward()
    return loss.detach(), count, h.grad, w.grad


def fused(h, w, y, m, **kw):
    return masked_linear_cross_entropy(h, w, y, m, config=kw.pop("config", SMALL), **kw)


def run_fused(hidden, weight, labels, mask, **kw):
    """Worker side: ``run(fused, ...)``."""
    return run(fused, hidden, weight, labels, mask, **kw)


def assert_close_grads(got, want, rel: float):
    """Max-abs error relative to the largest entry: bf16 grads are rounded, not wrong."""
    scale = want.abs().max().clamp_min(1e-6)
    assert torch.isfinite(got).all()
    assert ((got.float() - want.float()).abs().max() / scale).item() < rel


@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_fp32_matches_reference_and_torch_ce(interpreted, z_loss):
    # vocab 101 is not a multiple of the 16-wide block; d 40 is not a multiple of 16 either.
    hidden, weight, labels, mask = make_case(37, 40, 101, keep=0.3, dtype=torch.float32, seed=1)
    loss, count, gh, gw = interpreted(run_fused, hidden, weight, labels, mask, z_loss=z_loss)
    r_loss, r_count, r_gh, r_gw = run(masked_cross_entropy_reference, hidden, weight, labels, mask,
                                      z_loss=z_loss)
    assert count.dtype == torch.int64 and count.item() == r_count.item() == mask.sum().item()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, r_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh, r_gh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, r_gw, rtol=1e-5, atol=1e-5)
    assert gh[~mask].abs().max().item() == 0.0  # masked rows get no gradient at all

    # Independent check against torch's own cross-entropy on the full logits.
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    logits = h @ w.t()
    ce = F.cross_entropy(logits, labels.masked_fill(~mask, -100), ignore_index=-100,
                         reduction="sum")
    ce = ce + z_loss * torch.logsumexp(logits[mask], dim=-1).square().sum()
    ce.backward()
    torch.testing.assert_close(loss, ce.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh, h.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, w.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_accumulate_in_fp32(interpreted, dtype):
    hidden, weight, labels, mask = make_case(40, 48, 77, keep=0.5, dtype=dtype, seed=2)
    loss, count, gh, gw = interpreted(run_fused, hidden, weight, labels, mask, z_loss=1e-4)
    assert gh.dtype == dtype and gw.dtype == dtype
    # Products of 16-bit numbers are exact in fp32, so with fp32 accumulation the loss equals the
    # reference on the same values upcast, to fp32 summation-order noise.
    e_loss, _, e_gh, e_gw = run(masked_cross_entropy_reference, hidden.float(), weight.float(),
                                labels, mask, z_loss=1e-4)
    torch.testing.assert_close(loss, e_loss, rtol=2e-5, atol=1e-4)
    # Gradient logits are rounded to the input dtype before the two gradient GEMMs.
    assert_close_grads(gh, e_gh, rel=2e-2)
    assert_close_grads(gw, e_gw, rel=2e-2)
    # The reference in the same dtype rounds its logits to 16 bits first: looser.
    r_loss, _, r_gh, r_gw = run(masked_cross_entropy_reference, hidden, weight, labels, mask,
                                z_loss=1e-4)
    torch.testing.assert_close(loss, r_loss, rtol=1e-2, atol=0.0)
    assert_close_grads(gh, r_gh, rel=5e-2)
    assert_close_grads(gw, r_gw, rel=5e-2)


def test_all_masked_gives_zero_loss_and_zero_grads(interpreted):
    hidden, weight, labels, _ = make_case(20, 32, 50, keep=0.0, dtype=torch.float32, seed=3)
    mask = torch.zeros(20, dtype=torch.float32)
    loss, count, gh, gw = interpreted(run_fused, hidden, weight, labels, mask, z_loss=1e-4)
    assert loss.item() == 0.0 and count.item() == 0
    assert gh.shape == hidden.shape and gw.shape == weight.shape
    assert gh.abs().max().item() == 0.0 and gw.abs().max().item() == 0.0


def test_single_token_and_tiny_vocab(interpreted):
    hidden, weight, labels, _ = make_case(1, 16, 3, keep=1.0, dtype=torch.float32, seed=4)
    mask = torch.ones(1)
    loss, count, gh, gw = interpreted(run_fused, hidden, weight, labels, mask)
    r_loss, _, r_gh, r_gw = run(masked_cross_entropy_reference, hidden, weight, labels, mask)
    assert count.item() == 1
    torch.testing.assert_close(loss, r_loss)
    torch.testing.assert_close(gh, r_gh)
    torch.testing.assert_close(gw, r_gw)


@pytest.mark.parametrize("cfg", [
    TileConfig(block_n=16, block_v=16, block_d=16, vocab_splits=4, chunk_bytes=1),
    TileConfig(block_n=32, block_v=32, block_d=32, vocab_splits=100, chunk_bytes=1 << 30),
    None,
], ids=["split4-chunk-per-block", "split-all-one-chunk", "default"])
def test_tilings_agree(interpreted, cfg):
    """Vocabulary splits (combined on the host) and backward chunking don't change the result."""
    hidden, weight, labels, mask = make_case(33, 24, 90, keep=0.6, dtype=torch.float32, seed=5)
    loss, _, gh, gw = interpreted(run_fused, hidden, weight, labels, mask, z_loss=1e-3,
                                  config=cfg)
    r_loss, _, r_gh, r_gw = run(masked_cross_entropy_reference, hidden, weight, labels, mask,
                                z_loss=1e-3)
    torch.testing.assert_close(loss, r_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh, r_gh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, r_gw, rtol=1e-5, atol=1e-5)


def run_frozen_weight(hidden, weight, labels, mask):
    """Worker side: [B, S, d] hidden, float mask, weight without requires_grad."""
    h = hidden.clone().requires_grad_()
    loss, count = fused(h, weight, labels, mask)
    loss.backward()
    return loss.detach(), h.grad, weight.grad


def test_batched_hidden_float_mask_and_frozen_weight(interpreted):
    """[B, S, d] inputs; a frozen output layer (stage 1 trains the projector only) gets no grad."""
    hidden, weight, labels, mask = make_case(2 * 13, 32, 70, keep=0.4, dtype=torch.float32, seed=6)
    loss, gh, gw = interpreted(run_frozen_weight, hidden.view(2, 13, 32), weight,
                               labels.view(2, 13), mask.float().view(2, 13))
    hr = hidden.clone().requires_grad_()
    r_loss, _ = masked_cross_entropy_reference(hr, weight, labels, mask)
    r_loss.backward()
    assert gw is None
    torch.testing.assert_close(loss, r_loss.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh.view(-1, 32), hr.grad, rtol=1e-5, atol=1e-5)


def run_scaled(hidden, weight, labels, mask, scale):
    """Worker side: backward of loss * scale (the trainer divides by the global token count)."""
    h = hidden.clone().requires_grad_()
    loss, _ = fused(h, weight, labels, mask, z_loss=1e-2)
    (loss * scale).backward()
    return h.grad


def test_grad_scale_is_applied(interpreted):
    hidden, weight, labels, mask = make_case(20, 16, 40, keep=0.5, dtype=torch.float32, seed=7)
    gh = interpreted(run_scaled, hidden, weight, labels, mask, 1 / 7)
    hr = hidden.clone().requires_grad_()
    r_loss, _ = masked_cross_entropy_reference(hr, weight, labels, mask, z_loss=1e-2)
    (r_loss / 7).backward()
    torch.testing.assert_close(gh, hr.grad, rtol=1e-5, atol=1e-6)


def run_dispatcher(override, hidden, weight, labels, mask):
    """Worker side: the megavlm.ops dispatcher under an override; records if it went fused."""
    calls = []
    real = fused_module.masked_linear_cross_entropy

    def recording(*args, **kwargs):
        calls.append("fused")
        return real(*args, **kwargs)

    with mock.patch.dict(os.environ, {ENV_OVERRIDE: override}), \
            mock.patch.object(fused_module, "masked_linear_cross_entropy", recording):
        return calls, run(masked_cross_entropy, hidden, weight, labels, mask, z_loss=1e-4)


@pytest.mark.parametrize("override", ["auto", "fused", "reference"])
def test_dispatcher_under_interpreter(interpreted, override):
    """With TRITON_INTERPRET=1, auto and fused take the kernel, reference doesn't; all agree."""
    hidden, weight, labels, mask = make_case(18, 32, 40, keep=0.4, dtype=torch.float32, seed=8)
    calls, (loss, count, gh, gw) = interpreted(run_dispatcher, override, hidden.view(2, 9, 32),
                                               weight, labels.view(2, 9), mask.view(2, 9))
    assert calls == ([] if override == "reference" else ["fused"])
    r_loss, r_count, r_gh, r_gw = run(masked_cross_entropy_reference, hidden, weight, labels, mask,
                                      z_loss=1e-4)
    assert count.item() == r_count.item()
    torch.testing.assert_close(loss, r_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh.view(-1, 32), r_gh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, r_gw, rtol=1e-5, atol=1e-5)


def test_cpu_without_interpreter_is_unsupported(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ok, why = supports(torch.zeros(2, 4))
    assert not ok and "TRITON_INTERPRET" in why
    hidden, weight, labels, mask = make_case(4, 16, 8, keep=1.0, dtype=torch.float32, seed=9)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        masked_linear_cross_entropy(hidden, weight, labels, mask)


def supported(dtype: torch.dtype) -> tuple[bool, str]:
    """Worker side: ``supports`` on a CPU tensor of ``dtype``."""
    return supports(torch.zeros(2, 4, dtype=dtype))


def test_cpu_under_interpreter_is_supported_for_float_dtypes(interpreted):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert interpreted(supported, dtype) == (True, "ok")
    ok, why = interpreted(supported, torch.float64)
    assert not ok and "float64" in why


def test_triton_imported_without_interpreter_is_reported():
    """A process that imported Triton in compiled mode cannot interpret: supports() says so and the
    dispatcher falls back to the reference instead of failing inside the interpreter."""
    code = ("import os, torch, triton\n"
            "os.environ['TRITON_INTERPRET'] = '1'\n"
            "import megavlm.kernels.masked_ce as m\n"
            "from megavlm.ops.masked_ce import masked_cross_entropy\n"
            "ok, why = m.supports(torch.zeros(1))\n"
            "assert not ok and 'imported before' in why, why\n"
            "h, w = torch.randn(4, 16), torch.randn(8, 16)\n"
            "loss, n = masked_cross_entropy(h, w, torch.arange(4), torch.ones(4))\n"
            "assert n.item() == 4 and torch.isfinite(loss)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_import_needs_neither_triton_nor_cuda():
    """Importing the package and asking ``supports`` must not import Triton or touch CUDA."""
    code = ("import sys, torch, megavlm.kernels, megavlm.kernels.masked_ce as m\n"
            "ok, why = m.supports(torch.zeros(1))\n"
            "assert not ok, why\n"
            "assert 'triton' not in sys.modules, 'triton imported'\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


TP_CASE = dict(n=30, d=24, vocab=2 * 45, keep=0.5, dtype=torch.float32, seed=10)


class _CopyToTP(torch.autograd.Function):
    """Identity forward, all-reduce backward: megatron's copy_to_tensor_model_parallel_region."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _tp_main(rank: int, world: int, tmp: str) -> None:
    # A spawned process that has not imported Triton yet: the interpreter can be switched on here.
    os.environ["TRITON_INTERPRET"] = "1"
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank,
                            world_size=world)
    try:
        group = dist.new_group(list(range(world)))
        hidden, weight, labels, mask = make_case(**TP_CASE)
        for which, fn in (("reference", masked_cross_entropy_reference), ("fused", fused)):
            shard = weight.chunk(world)[rank].clone().requires_grad_()
            h = hidden.clone().requires_grad_()
            loss, count = fn(_CopyToTP.apply(h, group), shard, labels, mask, z_loss=1e-2,
                             tp_group=group)
            loss.backward()
            torch.save({"loss": loss.detach(), "count": count, "gh": h.grad, "gw": shard.grad},
                       f"{tmp}/{which}.{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_vocab_parallel_tp2_equals_tp1(tmp_path):
    world = 2
    mp.spawn(_tp_main, args=(world, str(tmp_path)), nprocs=world, join=True)
    hidden, weight, labels, mask = make_case(**TP_CASE)
    loss1, count1, gh1, gw1 = run(masked_cross_entropy_reference, hidden, weight, labels, mask,
                                  z_loss=1e-2)
    for which in ("reference", "fused"):
        res = [torch.load(tmp_path / f"{which}.{r}.pt") for r in range(world)]
        for r in res:
            assert r["count"].item() == count1.item()
            torch.testing.assert_close(r["loss"], loss1, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(r["gh"], gh1, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.cat([r["gw"] for r in res]), gw1, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_on_gpu_matches_reference(dtype):
    hidden, weight, labels, mask = make_case(4096, 256, 5003, keep=0.29, dtype=dtype, seed=11)
    args = [t.cuda() for t in (hidden, weight, labels, mask)]
    loss, count, gh, gw = run(masked_linear_cross_entropy, *args, z_loss=1e-4)
    up = [args[0].float(), args[1].float(), args[2], args[3]]
    e_loss, e_count, e_gh, e_gw = run(masked_cross_entropy_reference, *up, z_loss=1e-4)
    assert count.item() == e_count.item()
    torch.testing.assert_close(loss, e_loss, rtol=1e-4, atol=1e-2)
    assert_close_grads(gh, e_gh, rel=2e-2)
    assert_close_grads(gw, e_gw, rel=2e-2)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_larger_case_with_default_tiles(interpreted, dtype):
    """Caption-like masking (71 %), default GEMM-sized tiles, several vocabulary splits."""
    hidden, weight, labels, mask = make_case(600, 96, 1500, keep=0.29, dtype=dtype, seed=12)
    cfg = TileConfig(vocab_splits=3, chunk_bytes=200 * 512 * 2)
    loss, count, gh, gw = interpreted(run_fused, hidden, weight, labels, mask, z_loss=1e-4,
                                      config=cfg)
    e_loss, e_count, e_gh, e_gw = run(masked_cross_entropy_reference, hidden.float(),
                                      weight.float(), labels, mask, z_loss=1e-4)
    assert count.item() == e_count.item()
    torch.testing.assert_close(loss, e_loss, rtol=2e-5, atol=1e-3)
    rel = 1e-5 if dtype == torch.float32 else 2e-2
    assert_close_grads(gh, e_gh, rel=rel)
    assert_close_grads(gw, e_gw, rel=rel)
