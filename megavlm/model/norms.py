"""The two normalisations of the DCLM / OpenLM block.

* :class:`GainLayerNorm` — LayerNorm with a gain and no bias (OpenLM's ``LayerNorm`` with
  ``elementwise_bias=False``), used before attention, before the MLP and at the end.
* :class:`FullWidthQKNorm` — OpenLM's qk-norm: ONE LayerNorm over the whole heads×head_dim query
  (or key) vector, applied before the per-head reshape. megatron's own qk-norm normalises each
  head separately, which is a different function. Under tensor parallelism each rank holds only
  its heads, so the row sums are all-reduced across the TP group (forward and backward) and the gain
  is split across it like the heads. At TP 1 it is exactly torch's layer norm over the full width.

Both keep megatron's norm-builder signature ``(config, hidden_size, eps)`` so a layer spec can
name them where megatron expects a norm.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from torch import Tensor


class GainLayerNorm(MegatronModule):
    """LayerNorm(x) * gain, no bias, in x's dtype.

    torch's layer norm accumulates the statistics in fp32 for 16-bit inputs and saves only its
    input (x's dtype) and the per-row mean and 1/std (fp32) for the backward. Upcasting x first
    would save an fp32 copy of every normalised activation (2x the bytes in bf16) and add an fp32
    read/write round trip per norm (megavlm.model.memory counts what is saved)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__(config=config)
        self.eps = eps
        self.hidden_size = hidden_size
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        # Under sequence parallelism each TP rank sees a slice of the sequence: megatron's
        # finalize_model_grads all-reduces the grads of parameters marked like this.
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, (self.hidden_size,), self.weight.to(x.dtype), None, self.eps)


class _GroupLayerNorm(torch.autograd.Function):
    """Gain-only LayerNorm over a width split across ``group`` (each rank holds a slice of every
    row): the row sums are all-reduced in the forward, and the two row sums of the backward too.

    Saves only its input (in the input's dtype) and the per-row mean and 1/std in fp32, and
    recomputes the normalised rows in the backward, like torch's own layer norm: no fp32 copy of
    the activations is kept (megavlm.model.memory counts on that)."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, group, width: int, eps: float) -> Tensor:
        acc = torch.promote_types(h.dtype, torch.float32)  # fp32 for 16-bit inputs
        hf = h.to(acc)
        total = hf.sum(-1, keepdim=True)
        dist.all_reduce(total, group=group)
        mean = total / width
        sq = (hf - mean).square().sum(-1, keepdim=True)  # shifted: no E[x^2] - mean^2 cancellation
        dist.all_reduce(sq, group=group)
        rstd = torch.rsqrt(sq / width + eps)
        y = ((hf - mean) * rstd * weight.to(acc)).to(h.dtype)
        ctx.save_for_backward(h, weight, mean, rstd)
        ctx.group, ctx.width = group, width
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        h, weight, mean, rstd = ctx.saved_tensors
        acc = mean.dtype
        xhat = (h.to(acc) - mean) * rstd
        g = grad.to(acc)
        grad_w = (g * xhat).reshape(-1, xhat.shape[-1]).sum(0).to(weight.dtype)
        gw = g * weight.to(acc)
        sums = torch.cat([gw.sum(-1, keepdim=True), (gw * xhat).sum(-1, keepdim=True)], -1)
        dist.all_reduce(sums, group=ctx.group)
        dx = rstd * (gw - sums[..., :1] / ctx.width - xhat * (sums[..., 1:] / ctx.width))
        return dx.to(h.dtype), grad_w, None, None, None


class FullWidthQKNorm(MegatronModule):
    """Gain-only LayerNorm over all heads of q (or k): input [s, b, heads_local, head_dim]."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__(config=config)
        from megatron.core import parallel_state as ps

        self.tp_group = ps.get_tensor_model_parallel_group()
        self.tp_size = ps.get_tensor_model_parallel_world_size()
        heads = config.num_attention_heads
        if config.num_query_groups not in (None, heads):
            raise ValueError("FullWidthQKNorm supports multi-head attention only (num_query_groups == heads)")
        self.head_dim = hidden_size
        self.full_width = heads * hidden_size
        self.local_width = self.full_width // self.tp_size
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(self.local_width, dtype=config.params_dtype))
        set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=0, stride=1)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        if self.tp_size == 1:  # all heads here: exactly a layer norm over the full width
            h = x.reshape(*shape[:-2], self.local_width)
            return F.layer_norm(h, (self.local_width,), self.weight.to(x.dtype), None, self.eps).reshape(shape)
        h = x.reshape(*shape[:-2], self.local_width)
        return _GroupLayerNorm.apply(h, self.weight, self.tp_group, self.full_width, self.eps).reshape(shape)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state, prefix, {"weight": 0}, sharded_offsets)
