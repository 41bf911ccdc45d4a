"""The two normalisations of the DCLM / OpenLM block.

* :class:`GainLayerNorm` — LayerNorm with a gain and no bias (OpenLM's ``LayerNorm`` with
  ``elementwise_bias=False``), used before attention, before the MLP and at the end.
* :class:`FullWidthQKNorm` — OpenLM's qk-norm: ONE LayerNorm over the whole heads×head_dim query
  (or key) vector, applied before the per-head reshape. megatron's own qk-norm normalises each
  head separately, which is a different function. Under tensor parallelism each rank holds only
  its heads, so the mean and variance are summed across the TP group (forward and backward) and
  the gain is split across it like the heads.

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
    """LayerNorm(x) * gain, no bias; statistics and output in fp32, cast back to x's dtype."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__(config=config)
        self.eps = eps
        self.hidden_size = hidden_size
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        # Under sequence parallelism each TP rank sees a slice of the sequence: megatron's
        # finalize_model_grads all-reduces the grads of parameters marked like this.
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.float(), (self.hidden_size,), self.weight.float(), None, self.eps).to(x.dtype)


class _SumOverGroup(torch.autograd.Function):
    """All-reduce sum in forward AND backward: each rank's downstream differs (its own heads),
    so the gradient of a shared statistic is the sum of every rank's gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        g = grad.clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


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
        h = x.reshape(*shape[:-2], self.local_width).float()
        s = h.sum(-1, keepdim=True)
        if self.tp_size > 1:
            s = _SumOverGroup.apply(s, self.tp_group)
        mean = s / self.full_width
        c = h - mean
        sq = c.square().sum(-1, keepdim=True)
        if self.tp_size > 1:
            sq = _SumOverGroup.apply(sq, self.tp_group)
        y = c * torch.rsqrt(sq / self.full_width + self.eps) * self.weight.float()
        return y.to(x.dtype).reshape(shape)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state, prefix, {"weight": 0}, sharded_offsets)
