"""The DCLM / OpenLM block as megatron-core seats: which module kind sits where, not which
implementation fills it.

Why a module of its own: the local spec (megavlm.model.specs) and the Transformer Engine spec
(megavlm.model.te_spec) both fill these seats; keeping the seat layout here lets both import it
without importing each other.
"""

from __future__ import annotations

from functools import partial

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megavlm.model.norms import FullWidthQKNorm


def dclm_block(*, norm, column_linear, row_linear, core_attention, qk_norm: bool) -> ModuleSpec:
    """The DCLM block's seats — pre-norm, full-width qk-norm, SwiGLU, no biases — filled with the
    given implementations. The local and the TE spec differ only in what fills them.

    Attention is causal; rows packed with several documents reach the core-attention seat as
    document boundaries (megatron's ``PackedSeqParams``, see megavlm.model.attention), never as
    a dense mask."""
    norm_q = FullWidthQKNorm if qk_norm else IdentityOp
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=column_linear,
                    core_attention=core_attention,
                    linear_proj=row_linear,
                    q_layernorm=norm_q,
                    k_layernorm=norm_q,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=partial(MLP.as_mlp_submodule,
                        submodules=MLPSubmodules(linear_fc1=column_linear, linear_fc2=row_linear)),
            mlp_bda=get_bias_dropout_add,
        ),
    )
