"""The Transformer Engine layer spec of the DCLM / OpenLM block (GPU only; imported lazily).

Why a separate module: megatron-core's ``extensions/transformer_engine.py`` imports TE at module
level, and TE without a driver raises OSError on import. Nothing here runs at import time;
:func:`dclm_te_layer_spec` imports TE when it is called, which megavlm.model.specs only does after
``select_backend`` has found TE and a CUDA device. The seat layout comes from
megavlm.model.block, which the local spec uses too.

Which TE module fills which seat, and why:

* QKV / out / SwiGLU fc1 / fc2 → ``TEColumnParallelLinear`` / ``TERowParallelLinear``: TE GEMMs
  (cuBLASLt, FP8 under ``fp8_autocast``), same parameter names and shard layouts as the local
  spec (``linear_qkv.weight`` grouped per head, ``linear_fc1.weight`` = [gate; up]), so
  megavlm.model.init, the checkpoints and the converters work unchanged.
* The two pre-norms stay gain-only LayerNorms (:class:`NativeGainLayerNorm`, a
  :class:`~megavlm.model.norms.GainLayerNorm` without its fp32 round trip): TE's LayerNorm (alone
  as ``TENorm`` or fused in ``TELayerNormColumnParallelLinear``) always owns a bias parameter when
  ``normalization="LayerNorm"``. A bias pinned at zero would be a parameter the optimizer steps
  and the checkpoints carry that OpenLM does not have, so the fused LN+GEMM is given up here.
* qk-norm stays :class:`~megavlm.model.norms.FullWidthQKNorm` (one LayerNorm over heads×head_dim,
  statistics summed over the TP group): TE and megatron only offer a per-head qk-norm.
* Core attention → ``TEDotProductAttention`` (flash / cuDNN fused attention): causal rows in
  the ``sbhd`` layout with TE's causal mask type; packed rows in the ``thd`` layout with
  ``cu_seqlens`` (megavlm.model.attention.document_boundaries; megatron turns the causal mask
  type into ``padding_causal`` for thd, which is causal within each document), so packed rows
  stay on the fused kernels and no mask is ever built. :func:`_document_te_attention` only drops
  the host copy of the offsets that megatron's THD rotary reads (TE wants every offset tensor on
  the device) and refuses a dense mask.

FP8 is not a spec matter: megatron's TransformerBlock enters TE's ``fp8_autocast`` with the
recipe from ``TransformerConfig.fp8 / fp8_recipe`` (megatron/core/transformer/transformer_block.py
:600-660, megatron/core/fp8_utils.py get_fp8_context); megavlm.model.specs.transformer_config sets
those fields from ``precision.fp8``.
"""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core.transformer.spec_utils import ModuleSpec

from megavlm.model.block import dclm_block
from megavlm.model.norms import GainLayerNorm


class NativeGainLayerNorm(GainLayerNorm):
    """GainLayerNorm computed in the input's dtype: same parameter, same function.

    GainLayerNorm computes in fp32 and casts back, on any device. On CUDA, ``layer_norm`` of a
    bf16 input already accumulates its statistics in fp32, so the two extra fp32 copies only add
    memory traffic (about three times the norm's own) — 48 norms per token at 1.4B."""

    def forward(self, x):
        return F.layer_norm(x, (self.hidden_size,), self.weight.to(x.dtype), None, self.eps)


def _document_te_attention():
    """A TEDotProductAttention that takes our document boundaries (built on call because its base
    class exists only where TE imports)."""
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    from megavlm.model.attention import for_device_kernels

    class DocumentTEDotProductAttention(TEDotProductAttention):
        """causal rows → TE's causal kernels; packed rows (thd + cu_seqlens) → padding_causal."""

        def forward(self, query, key, value, attention_mask, attn_mask_type, attention_bias=None,
                    packed_seq_params=None, **kwargs):
            if attention_mask is not None:
                raise ValueError("the TE seat takes document boundaries (packed_seq_params), not a "
                                 f"dense attention mask (got {tuple(attention_mask.shape)})")
            if packed_seq_params is not None:
                packed_seq_params = for_device_kernels(packed_seq_params)
            return super().forward(query, key, value, None, attn_mask_type, attention_bias,
                                   packed_seq_params, **kwargs)

    return DocumentTEDotProductAttention


def dclm_te_layer_spec(qk_norm: bool = True) -> ModuleSpec:
    """The DCLM block with TE GEMMs and attention (see the module docstring for each seat)."""
    from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear

    return dclm_block(norm=NativeGainLayerNorm, column_linear=TEColumnParallelLinear,
                      row_linear=TERowParallelLinear, core_attention=_document_te_attention(),
                      qk_norm=qk_norm)
