"""Masked linear cross-entropy: the loss of every megavlm step.

In caption rows about 71 % of positions are image patches that carry no loss, so the loss gathers
the hidden states of the positions whose loss mask is 1 *first* and computes logits only for
those. It returns the loss **sum** and the number of loss tokens; the training step divides once
by the global count over all microbatches and data-parallel ranks.

``masked_cross_entropy_reference`` is the spec, in plain PyTorch. It is vocab-parallel: with a
tensor-parallel group, ``weight`` is this rank's vocabulary shard and the max, the sum of
exponentials and the target logit are combined across the group. The caller hands in hidden
states whose backward already reduces over the TP group (megatron's
``copy_to_tensor_model_parallel_region`` or the sequence-parallel gather), exactly as megatron's
ColumnParallelLinear does for its input.

``masked_cross_entropy`` is the one dispatcher: fused kernel (``megavlm.kernels.masked_ce``, a
subpackage of megavlm, so it is present however megavlm is installed or put on PYTHONPATH) or the
reference. ``MEGAVLM_MASKED_CE=auto|reference|fused`` chooses: ``auto`` (default) takes the fused
kernel where it can run and the reference elsewhere; ``fused`` where the kernel cannot run (no
Triton, no CUDA and no interpreter, an import error) is an error naming the reason, never a
silent fallback. ``masked_ce_path(device, dtype)`` answers which path runs and why, so reports
(``megavlm selftest``, benchmarks) can say which one ran.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

ENV_OVERRIDE = "MEGAVLM_MASKED_CE"
_NO_IGNORE = torch.iinfo(torch.int64).min


class _AllReduceSum(torch.autograd.Function):
    """Sum over a group in forward; identity in backward.

    Everything downstream of the sum is computed identically on every rank of the group, so the
    upstream gradient of the sum is the same everywhere and is the gradient of each local part.
    """

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        y = x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def _tp_info(group) -> tuple[int, int]:
    if group is None or dist.get_world_size(group) == 1:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def masked_cross_entropy_reference(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    loss_mask: Tensor,
    *,
    z_loss: float = 0.0,
    tp_group: Optional[dist.ProcessGroup] = None,
) -> tuple[Tensor, Tensor]:
    """Cross-entropy summed over the positions with ``loss_mask == 1``.

    Args:
        hidden: [N, d] final hidden states (any float dtype).
        weight: [V_local, d] output projection (this rank's vocab shard under TP).
        labels: [N] int64 target ids in the full vocabulary; at loss positions they must lie in
            [0, V) (-100 belongs only at masked positions).
        loss_mask: [N] 0/1 (float or bool).
        z_loss: coefficient of (log Z)^2, added per loss token.
        tp_group: tensor-parallel group over which the vocabulary is split.

    Returns:
        (loss_sum fp32 scalar, count int64 scalar). Logits come out of the matmul in the input
        dtype (fp32 accumulation inside it) and everything after it is fp32; the fused kernel
        keeps its logits in fp32 throughout, so for 16-bit inputs the two differ by the rounding
        of the logits to 16 bits.
    """
    rank, world = _tp_info(tp_group)
    keep = loss_mask.reshape(-1) > 0
    count = keep.sum()
    idx = keep.nonzero(as_tuple=True)[0]
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, idx)
    y = labels.reshape(-1).index_select(0, idx)
    logits = (h @ weight.t()).float()  # [n, V_local] — only the loss positions
    if world == 1:
        # One rank: exactly torch's cross-entropy on the gathered rows (its fused log-softmax
        # backward keeps the temporaries to about two [n, V] tensors).
        # No ignore_index: a label outside [0, V) at a loss position is an error, not a skip.
        loss = F.cross_entropy(logits, y, reduction="sum", ignore_index=_NO_IGNORE)
        if z_loss:
            loss = loss + z_loss * torch.logsumexp(logits, dim=-1).square().sum()
        return loss, count

    v_local = weight.shape[0]
    vocab_start = rank * v_local
    local_max = logits.detach().max(dim=-1).values if logits.shape[0] else logits.new_zeros(0)
    dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=tp_group)
    shifted = logits - local_max.unsqueeze(-1)
    sum_exp = _AllReduceSum.apply(shifted.exp().sum(dim=-1), tp_group)

    in_shard = (y >= vocab_start) & (y < vocab_start + v_local)
    local_y = (y - vocab_start).clamp(0, v_local - 1)
    target = shifted.gather(-1, local_y.unsqueeze(-1)).squeeze(-1) * in_shard
    target = _AllReduceSum.apply(target, tp_group)

    log_z = sum_exp.log()  # log-sum-exp relative to the max
    loss = log_z - target
    if z_loss:
        loss = loss + z_loss * (log_z + local_max).square()
    return loss.sum(), count


@dataclass(frozen=True)
class PathChoice:
    """Which masked-CE implementation runs for a device and dtype, and why."""

    path: str
    """``"fused"`` (megavlm.kernels Triton kernel) or ``"reference"`` (plain PyTorch)."""
    reason: str
    """Why: the override that forced it, or why the fused kernel can or cannot run."""
    requested: str
    """The value of MEGAVLM_MASKED_CE (``auto`` when unset)."""


def _requested() -> str:
    choice = os.environ.get(ENV_OVERRIDE, "auto").strip().lower() or "auto"
    if choice not in ("auto", "reference", "fused"):
        raise ValueError(f"{ENV_OVERRIDE}={choice!r}: expected auto, reference or fused")
    return choice


def _fused_available(hidden: Tensor) -> tuple[bool, str]:
    try:
        fused = importlib.import_module("megavlm.kernels.masked_ce")
    except Exception as e:  # a GPU library may raise more than ImportError without a driver
        return False, f"megavlm.kernels.masked_ce is not importable ({type(e).__name__}: {e})"
    return fused.supports(hidden)


def _choose(hidden: Tensor) -> PathChoice:
    requested = _requested()
    if requested == "reference":
        return PathChoice("reference", f"forced by {ENV_OVERRIDE}=reference", requested)
    ok, why = _fused_available(hidden)
    if ok:
        return PathChoice("fused", "fused Triton kernel supports this device and dtype", requested)
    if requested == "fused":
        raise RuntimeError(f"{ENV_OVERRIDE}=fused but the fused kernel cannot run: {why}")
    return PathChoice("reference", f"fused kernel cannot run: {why}", requested)


def masked_ce_path(device: Union[str, torch.device] = "cpu",
                   dtype: torch.dtype = torch.bfloat16) -> PathChoice:
    """The path ``masked_cross_entropy`` takes for hidden states on ``device`` in ``dtype``.

    Raises what the dispatcher would raise: ValueError for an unknown override, RuntimeError for
    ``MEGAVLM_MASKED_CE=fused`` where the kernel cannot run.
    """
    return _choose(torch.empty(0, device=device, dtype=dtype))


def masked_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, loss_mask: Tensor, *,
                         z_loss: float = 0.0, tp_group=None) -> tuple[Tensor, Tensor]:
    """Dispatch to the fused kernel when it can run, else the reference (see module docstring)."""
    if _choose(hidden).path == "fused":
        fused = importlib.import_module("megavlm.kernels.masked_ce")
        return fused.masked_linear_cross_entropy(hidden, weight, labels, loss_mask,
                                                 z_loss=z_loss, tp_group=tp_group)
    return masked_cross_entropy_reference(hidden, weight, labels, loss_mask, z_loss=z_loss,
                                          tp_group=tp_group)
