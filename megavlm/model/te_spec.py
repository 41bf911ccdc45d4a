"""The Transformer Engine layer spec of the DCLM / OpenLM block (GPU only; imported lazily).

Why a separate module: megatron-core's ``extensions/transformer_engine.py`` imports TE at module
level, and TE without a driver raises OSError on import. Nothing here runs at import time;
:func:`dclm_te_layer_spec` imports TE when it is called, which megavlm.model.specs only does after
``select_backend`` has found TE and a CUDA device.

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
* Core attention → ``TEDotProductAttention`` (flash / cuDNN fused attention) for causal rows. Rows
  packed with several documents arrive with an explicit block-causal mask (see
  megavlm.train.step.packed_attention_mask); TE ignores masks under the ``causal`` mask type, so
  :func:`_mask_aware_te_attention` switches such calls to TE's ``arbitrary`` mask type, which is
  exact but may fall back to TE's unfused attention. (The fast path for packed rows — THD layout
  with cu_seqlens — is a later change; the benchmark reports which rows it feeds.)

FP8 is not a spec matter: megatron's TransformerBlock enters TE's ``fp8_autocast`` with the
recipe from ``TransformerConfig.fp8 / fp8_recipe`` (megatron/core/transformer/transformer_block.py
:600-660, megatron/core/fp8_utils.py get_fp8_context); megavlm.model.specs.transformer_config sets
those fields from ``train.fp8``.
"""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec

from megavlm.model.norms import GainLayerNorm


class NativeGainLayerNorm(GainLayerNorm):
    """GainLayerNorm computed in the input's dtype: same parameter, same function.

    GainLayerNorm computes in fp32 and casts back, on any device. On CUDA, ``layer_norm`` of a
    bf16 input already accumulates its statistics in fp32, so the two extra fp32 copies only add
    memory traffic (about three times the norm's own) — 48 norms per token at 1.4B."""

    def forward(self, x):
        return F.layer_norm(x, (self.hidden_size,), self.weight.to(x.dtype), None, self.eps)


def _mask_aware_te_attention():
    """A TEDotProductAttention that honours an explicit (packed-document) mask.

    Built on call because its base class exists only where TE imports."""
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    class MaskAwareTEDotProductAttention(TEDotProductAttention):
        """causal rows → TE's causal kernels; a given [B,1,S,S] mask (True = blocked) → arbitrary."""

        def forward(self, query, key, value, attention_mask, attn_mask_type, *args, **kwargs):
            if attention_mask is not None and attn_mask_type == AttnMaskType.causal:
                attn_mask_type = AttnMaskType.arbitrary
            return super().forward(query, key, value, attention_mask, attn_mask_type, *args, **kwargs)

    return MaskAwareTEDotProductAttention


def dclm_te_layer_spec(qk_norm: bool = True) -> ModuleSpec:
    """The DCLM block with TE GEMMs and attention (see the module docstring for each seat)."""
    from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear

    from megavlm.model.specs import dclm_block

    return dclm_block(norm=NativeGainLayerNorm, column_linear=TEColumnParallelLinear,
                      row_linear=TERowParallelLinear, core_attention=_mask_aware_te_attention(),
                      qk_norm=qk_norm)
