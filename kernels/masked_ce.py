"""Host side of the fused masked linear cross-entropy: gather, launch, combine, autograd.

Why it exists: in caption rows ~71 % of positions are image patches with no loss. This path
gathers the rows with ``loss_mask == 1`` and computes the loss on those only, without ever holding
a [rows x vocab] logits tensor: the forward kernel keeps an online log-sum-exp per row (logits
live in registers, one tile at a time), and the backward recomputes logits tile by tile and
materialises gradient logits for one vocabulary chunk at a time (``TileConfig.chunk_bytes``),
which two GEMMs turn into the weight gradient (written once per chunk, in the weight's dtype) and
the hidden-state gradient (accumulated in fp32 over the chunks).

Semantics are those of ``megavlm.ops.masked_ce.masked_cross_entropy_reference`` (the spec):
``weight`` is this rank's vocabulary shard, rows' max, sum-exp and target logit are combined over
``tp_group``; the gradient of the hidden states is this rank's partial (the caller's TP-reducing
backward sums it). Returns (loss sum fp32 scalar, count int64 scalar).

Where it runs: CUDA tensors via compiled Triton; CPU tensors via the Triton interpreter, only when
``TRITON_INTERPRET=1`` is set, and was set before this process first imported Triton (tests;
tests/kernels/conftest.py). Importing this module never imports Triton.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

if TYPE_CHECKING:
    from .masked_ce_triton import MaskedCEKernels

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class TileConfig:
    """Tiling of the two kernels; ``default_config`` picks one per dtype."""

    block_n: int = 128
    """Gathered rows per program."""
    block_v: int = 128
    """Vocabulary entries per logits tile."""
    block_d: int = 64
    """Hidden-dimension slice per ``tl.dot``."""
    vocab_splits: Optional[int] = None
    """Forward: programs along the vocabulary per row block; None fills the device."""
    chunk_bytes: int = 64 << 20
    """Backward: bytes of gradient logits materialised at once (one vocabulary chunk)."""
    num_warps: int = 8
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_n", "block_v", "block_d"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"TileConfig.{name}={value}: must be a power of two >= 16")
        if self.vocab_splits is not None and self.vocab_splits < 1:
            raise ValueError(f"TileConfig.vocab_splits={self.vocab_splits}: must be >= 1")
        if self.chunk_bytes < 1:
            raise ValueError(f"TileConfig.chunk_bytes={self.chunk_bytes}: must be >= 1")


def default_config(dtype: torch.dtype) -> TileConfig:
    """GEMM-like 128 x 128 x 64 tiles for 16-bit inputs; a smaller K slice for fp32 so that three
    pipeline stages stay within an A100's shared memory. Not yet tuned on a GPU."""
    if dtype == torch.float32:
        return TileConfig(block_n=64, block_v=128, block_d=32, num_warps=8, num_stages=3)
    return TileConfig()


def supports(hidden: Tensor) -> tuple[bool, str]:
    """Whether the fused path can run on ``hidden``'s device and dtype, and why not."""
    if hidden.dtype not in SUPPORTED_DTYPES:
        return False, f"dtype {hidden.dtype} is not one of {SUPPORTED_DTYPES}"
    if hidden.device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return False, "CPU tensors run only under the Triton interpreter (TRITON_INTERPRET=1)"
        if _triton_imported_compiled():
            return False, ("triton was imported before TRITON_INTERPRET=1 was set; its own helpers "
                           "are compiled-mode and the interpreter cannot run them")
    elif hidden.device.type == "cuda":
        try:
            if not torch.cuda.is_available():
                return False, "CUDA tensor but torch.cuda.is_available() is False"
            if (hidden.dtype == torch.bfloat16
                    and torch.version.hip is None
                    and torch.cuda.get_device_capability(hidden.device) < (8, 0)):
                return False, "bf16 tl.dot needs compute capability >= 8.0"
        except Exception as e:  # driver trouble surfaces as RuntimeError / OSError
            return False, f"CUDA query failed ({type(e).__name__}: {e})"
    else:
        return False, f"device type {hidden.device.type!r} is not supported"
    try:
        import triton  # noqa: F401
    except Exception as e:
        return False, f"triton is not importable ({type(e).__name__}: {e})"
    return True, "ok"


def _triton_imported_compiled() -> bool:
    """Whether this process imported Triton in compiled mode (its ``@jit`` helpers, like the
    combine function behind ``tl.sum``, are decorated once, when ``triton`` is imported)."""
    standard = sys.modules.get("triton.language.standard")
    helper = getattr(standard, "_sum_combine", None)
    if helper is None:
        return False
    from triton.runtime.jit import JITFunction
    return isinstance(helper, JITFunction)


def masked_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    loss_mask: Tensor,
    *,
    z_loss: float = 0.0,
    tp_group: Optional[dist.ProcessGroup] = None,
    config: Optional[TileConfig] = None,
) -> tuple[Tensor, Tensor]:
    """Cross-entropy (+ z_loss * lse^2) summed over the rows with ``loss_mask > 0``.

    Args:
        hidden: [..., d] hidden states (fp32, fp16 or bf16).
        weight: [V_local, d] output projection, same dtype and device; this rank's vocabulary
            shard under tensor parallelism (entries [rank * V_local, (rank + 1) * V_local)).
        labels: [...] int target ids in the full vocabulary; at loss positions they must lie in
            [0, V) — not checked here, as the check would synchronise with the device.
        loss_mask: [...] 0/1, float or bool.
        z_loss: coefficient of the squared log-partition function, per loss token.
        tp_group: group the vocabulary is split over (None: no split).
        config: tiling; defaults to ``default_config(hidden.dtype)``.

    Returns:
        (loss_sum fp32 scalar, count int64 scalar).
    """
    d = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != d:
        raise ValueError(f"weight {tuple(weight.shape)} does not match hidden dim {d}")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise TypeError(f"hidden ({hidden.dtype}, {hidden.device}) and weight ({weight.dtype}, "
                        f"{weight.device}) must share dtype and device")
    n_total = hidden.numel() // d if d else 0
    if labels.numel() != n_total or loss_mask.numel() != n_total:
        raise ValueError(f"labels ({labels.numel()}) and loss_mask ({loss_mask.numel()}) must "
                         f"have one entry per hidden row ({n_total})")
    ok, why = supports(hidden)
    if not ok:
        raise RuntimeError(f"fused masked cross-entropy cannot run here: {why}")
    cfg = config or default_config(hidden.dtype)
    rank, world = _tp_info(tp_group)

    keep = loss_mask.reshape(-1) > 0
    count = keep.sum()
    idx = keep.nonzero(as_tuple=True)[0]
    rows = hidden.reshape(-1, d).index_select(0, idx)
    v_local = weight.shape[0]
    local = labels.reshape(-1).index_select(0, idx).long() - rank * v_local
    target = torch.where((local >= 0) & (local < v_local), local, -1).to(torch.int32)
    loss = _MaskedLinearCE.apply(rows, weight, target, float(z_loss), tp_group, world, cfg)
    return loss, count


def _tp_info(group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    if group is None or dist.get_world_size(group) == 1:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _kernels(device: torch.device) -> MaskedCEKernels:
    from .masked_ce_triton import build_kernels
    return build_kernels(interpret=device.type == "cpu")


def _device_guard(device: torch.device) -> AbstractContextManager[Any]:
    """Triton launches on the current CUDA device: make it the tensors' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _launch_options(cfg: TileConfig, rows: Tensor) -> dict[str, Any]:
    return dict(BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
                PRECISION="ieee" if rows.dtype == torch.float32 else "tf32",
                UPCAST=rows.device.type == "cpu" and rows.dtype == torch.bfloat16,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def vocab_splits(cfg: TileConfig, multiprocessors: Optional[int], row_blocks: int,
                 vocab_blocks: int) -> int:
    """Forward programs along the vocabulary per row block: enough programs to fill the device
    (4 per multiprocessor; ``multiprocessors=None`` on the CPU: 1), at most one per vocab block."""
    if cfg.vocab_splits is not None:
        wanted = cfg.vocab_splits
    elif multiprocessors is not None:
        wanted = _cdiv(4 * multiprocessors, row_blocks)
    else:
        wanted = 1
    return max(1, min(wanted, vocab_blocks))


def forward_grid(cfg: TileConfig, n: int, vocab: int,
                 multiprocessors: Optional[int]) -> tuple[int, int, int]:
    """(row blocks, vocabulary splits, vocabulary blocks per split) of the forward launch."""
    row_blocks = _cdiv(n, cfg.block_n)
    vocab_blocks = _cdiv(vocab, cfg.block_v)
    splits = vocab_splits(cfg, multiprocessors, row_blocks, vocab_blocks)
    blocks_per_split = _cdiv(vocab_blocks, splits)
    return row_blocks, _cdiv(vocab_blocks, blocks_per_split), blocks_per_split  # no empty split


def backward_chunk(cfg: TileConfig, n: int, vocab: int, element_size: int) -> int:
    """Vocabulary columns of gradient logits materialised at once by the backward."""
    chunk = (cfg.chunk_bytes // (n * element_size)) // cfg.block_v * cfg.block_v
    return max(cfg.block_v, min(chunk, _cdiv(vocab, cfg.block_v) * cfg.block_v))


def _multiprocessors(device: torch.device) -> Optional[int]:
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def _row_lse(rows: Tensor, weight: Tensor, target: Tensor, cfg: TileConfig,
             tp_group: Optional[dist.ProcessGroup], world: int) -> tuple[Tensor, Tensor]:
    """Per-row log-sum-exp over the full (possibly sharded) vocabulary and target logit, fp32."""
    n, d = rows.shape
    vocab = weight.shape[0]
    row_blocks, splits, blocks_per_split = forward_grid(cfg, n, vocab,
                                                        _multiprocessors(rows.device))
    part = torch.empty((3, splits, n), dtype=torch.float32, device=rows.device)
    _kernels(rows.device).lse_partials[(row_blocks, splits)](
        rows, weight, target, part[0], part[1], part[2],
        n, vocab, d, rows.stride(0), weight.stride(0), blocks_per_split,
        **_launch_options(cfg, rows))
    row_max = part[0].max(dim=0).values
    sum_exp = (part[1] * torch.exp(part[0] - row_max)).sum(dim=0)
    target_logit = part[2].sum(dim=0)
    if world > 1:
        local_max = row_max.clone()
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=tp_group)
        both = torch.stack([sum_exp * torch.exp(local_max - row_max), target_logit])
        dist.all_reduce(both, op=dist.ReduceOp.SUM, group=tp_group)
        sum_exp, target_logit = both[0], both[1]
    return row_max + torch.log(sum_exp), target_logit


class _MaskedLinearCE(torch.autograd.Function):
    """loss_sum(rows, weight) on already-gathered rows; see the module docstring."""

    @staticmethod
    def forward(ctx, rows: Tensor, weight: Tensor, target: Tensor, z_loss: float,
                tp_group: Optional[dist.ProcessGroup], world: int, cfg: TileConfig) -> Tensor:
        rows = rows.contiguous()
        weight = weight if weight.stride(-1) == 1 else weight.contiguous()
        ctx.z_loss, ctx.cfg = z_loss, cfg
        if rows.shape[0] == 0:
            ctx.save_for_backward(rows, weight, target, rows.new_empty(0, dtype=torch.float32))
            return torch.zeros((), dtype=torch.float32, device=rows.device)
        with _device_guard(rows.device):
            lse, target_logit = _row_lse(rows, weight, target, cfg, tp_group, world)
        loss = lse - target_logit
        if z_loss:
            loss = loss + z_loss * lse.square()
        ctx.save_for_backward(rows, weight, target, lse)
        return loss.sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: Tensor):
        rows, weight, target, lse = ctx.saved_tensors
        need_rows, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, d = rows.shape
        vocab = weight.shape[0]
        grad_rows = (torch.zeros((n, d), dtype=torch.float32, device=rows.device)
                     if need_rows else None)
        grad_weight = ((torch.zeros_like(weight) if n == 0 else torch.empty_like(weight))
                       if need_weight else None)
        if n == 0 or not (need_rows or need_weight):
            return (grad_rows.to(rows.dtype) if need_rows else None), grad_weight, \
                None, None, None, None, None

        cfg: TileConfig = ctx.cfg
        g = grad_loss.detach().to(torch.float32).reshape(1).contiguous()
        # d(lse - target + z lse^2)/d logits = (1 + 2 z lse) softmax - onehot, times g.
        coef = (g * (1.0 + 2.0 * ctx.z_loss * lse)).contiguous()
        chunk = backward_chunk(cfg, n, vocab, rows.element_size())
        buf = torch.empty((n, chunk), dtype=rows.dtype, device=rows.device)
        kernel = _kernels(rows.device).dlogits
        options = _launch_options(cfg, rows)
        with _device_guard(rows.device):
            for start in range(0, vocab, chunk):
                width = min(chunk, vocab - start)
                dlogits = buf[:, :width]
                kernel[(_cdiv(n, cfg.block_n), _cdiv(width, cfg.block_v))](
                    rows, weight, target, lse, coef, g, dlogits,
                    n, vocab, d, rows.stride(0), weight.stride(0), buf.stride(0), start, width,
                    **options)
                if need_weight:
                    torch.mm(dlogits.t(), rows, out=grad_weight[start:start + width])
                if need_rows:
                    grad_rows += torch.mm(dlogits, weight[start:start + width])
        return (grad_rows.to(rows.dtype) if need_rows else None), grad_weight, \
            None, None, None, None, None
