"""Triton kernel bodies of the fused masked linear cross-entropy.

Two kernels, both on rows that were already gathered (only the positions with loss_mask == 1):

* ``lse_partials`` — forward. A program owns a block of rows and a contiguous range of vocabulary
  blocks ("split"). For each vocabulary block it forms the logits tile with ``tl.dot`` over the
  hidden dimension (fp32 accumulator), folds it into a running max / sum-of-exponentials (online
  log-sum-exp) and picks out the target logit. It writes one (max, sum-exp, target) triple per row
  and split; the host combines the splits (and, under tensor parallelism, the ranks). The logits
  tile lives only in registers.
* ``dlogits`` — backward. Recomputes the logits of one [rows x vocab] tile the same way and writes
  d loss / d logits = coef * softmax - g * onehot for one vocabulary *chunk* of the gathered rows;
  the host turns that chunk into the weight and hidden gradients with two GEMMs and moves on, so at
  most one chunk of gradient logits exists at a time.

``UPCAST`` is set only under the interpreter for bf16 inputs: Triton 3.9's interpreter multiplies
the raw uint16 bit patterns of bf16 blocks in ``tl.dot``. A bf16 x bf16 product is exact in fp32,
so upcasting the operands first gives the same fp32-accumulated result the GPU computes.

The bodies are plain functions, not ``@triton.jit``-decorated: ``build_kernels`` wraps them as
compiled ``JITFunction``s (CUDA tensors) or as the CPU interpreter's ``InterpretedFunction``s
(``TRITON_INTERPRET=1``, CPU tensors). Triton's decorator decides between the two at decoration
time; deciding per call instead keeps these kernels independent of when this module was first
imported. (Triton's own ``@jit`` helpers are still fixed when ``triton`` itself is imported, so
interpreting needs TRITON_INTERPRET=1 before that: ``masked_ce.supports`` checks it.)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import triton.language as tl


def _lse_partials(
    h_ptr, w_ptr, tgt_ptr, max_ptr, sumexp_ptr, target_ptr,
    n_rows, vocab, dim, stride_h, stride_w, blocks_per_split,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < n_rows
    tgt = tl.load(tgt_ptr + offs_n, mask=row_ok, other=-1)
    offs_n64 = offs_n.to(tl.int64)

    run_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_N,), tl.float32)
    run_tgt = tl.zeros((BLOCK_N,), tl.float32)
    for vb in range(0, blocks_per_split):
        offs_v = (pid_s * blocks_per_split + vb) * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = offs_v < vocab
        offs_v64 = offs_v.to(tl.int64)
        acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = offs_d < dim
            a = tl.load(h_ptr + offs_n64[:, None] * stride_h + offs_d[None, :],
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            b = tl.load(w_ptr + offs_v64[None, :] * stride_w + offs_d[:, None],
                        mask=d_ok[:, None] & col_ok[None, :], other=0.0)
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        logits = tl.where(col_ok[None, :], acc, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(logits, axis=1))
        # A block past the end of the vocabulary leaves new_max at -inf; shift by 0 there.
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - safe_max) + tl.sum(
            tl.exp(logits - safe_max[:, None]), axis=1)
        run_max = new_max
        run_tgt += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], acc, 0.0), axis=1)

    out = pid_s * n_rows + offs_n
    tl.store(max_ptr + out, run_max, mask=row_ok)
    tl.store(sumexp_ptr + out, run_sum, mask=row_ok)
    tl.store(target_ptr + out, run_tgt, mask=row_ok)


def _dlogits(
    h_ptr, w_ptr, tgt_ptr, lse_ptr, coef_ptr, grad_ptr, out_ptr,
    n_rows, vocab, dim, stride_h, stride_w, stride_out, chunk_start, chunk_width,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < n_rows
    offs_c = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)  # column inside the chunk
    offs_v = chunk_start + offs_c  # column inside this rank's vocabulary shard
    col_ok = (offs_c < chunk_width) & (offs_v < vocab)
    offs_n64 = offs_n.to(tl.int64)
    offs_v64 = offs_v.to(tl.int64)

    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < dim
        a = tl.load(h_ptr + offs_n64[:, None] * stride_h + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        b = tl.load(w_ptr + offs_v64[None, :] * stride_w + offs_d[:, None],
                    mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    lse = tl.load(lse_ptr + offs_n, mask=row_ok, other=0.0)
    coef = tl.load(coef_ptr + offs_n, mask=row_ok, other=0.0)
    tgt = tl.load(tgt_ptr + offs_n, mask=row_ok, other=-1)
    g = tl.load(grad_ptr)
    prob = tl.exp(acc - lse[:, None])
    d = coef[:, None] * prob - tl.where(offs_v[None, :] == tgt[:, None], g, 0.0)
    ok = row_ok[:, None] & col_ok[None, :]
    d = tl.where(ok, d, 0.0)
    tl.store(out_ptr + offs_n64[:, None] * stride_out + offs_c[None, :],
             d.to(out_ptr.dtype.element_ty), mask=ok)


@dataclass(frozen=True)
class MaskedCEKernels:
    """The two launchable kernels, either compiled or interpreted."""

    lse_partials: Any
    dlogits: Any


@functools.cache
def build_kernels(interpret: bool) -> MaskedCEKernels:
    """Wrap the kernel bodies for the Triton CPU interpreter or for compilation (memoised)."""
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction as wrap
    else:
        from triton.runtime.jit import JITFunction as wrap
    return MaskedCEKernels(lse_partials=wrap(_lse_partials), dlogits=wrap(_dlogits))
