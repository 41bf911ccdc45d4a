"""Layer specs for the DCLM / OpenLM block, and the megatron TransformerConfig of a recipe.

megatron-core builds layers from *specs* (which class fills which seat). The local spec uses only
megatron-core modules plus our two norms and runs anywhere (CPU included). The Transformer
Engine spec — fused TE linears and attention, BF16/FP8 — fills the same seats on GPUs; it is
chosen by :func:`select_backend`, so model code never branches on TE.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megavlm.config import ModelConfig, ParallelConfig
from megavlm.model.attention import SDPAttention
from megavlm.model.block import dclm_block
from megavlm.model.norms import GainLayerNorm
from megavlm.model.te_spec import dclm_te_layer_spec

Backend = Literal["local", "te"]


def te_usable() -> bool:
    """Transformer Engine is importable and a CUDA device is present (TE raises OSError, not only
    ImportError, when its libraries find no driver)."""
    try:
        if importlib.util.find_spec("transformer_engine") is None:
            return False
        if not (torch.version.cuda and torch.cuda.is_available()):
            return False
        import transformer_engine.pytorch  # noqa: F401
        return True
    except Exception:
        return False


def select_backend(requested: str = "auto") -> Backend:
    if requested == "local":
        return "local"
    if requested == "te":
        if not te_usable():
            raise RuntimeError("the TE layer spec needs transformer-engine and a CUDA GPU")
        return "te"
    return "te" if te_usable() else "local"


def dclm_local_layer_spec(qk_norm: bool = True) -> ModuleSpec:
    """The DCLM block from megatron-core modules and our SDPA core attention (runs anywhere, CPU
    included; packed rows attend per document, see megavlm.model.attention)."""
    return dclm_block(norm=GainLayerNorm, column_linear=ColumnParallelLinear,
                      row_linear=RowParallelLinear, core_attention=SDPAttention, qk_norm=qk_norm)


def block_spec(num_layers_here: int, qk_norm: bool, backend: Backend) -> TransformerBlockSubmodules:
    layer = dclm_te_layer_spec(qk_norm) if backend == "te" else dclm_local_layer_spec(qk_norm)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers_here, layer_norm=GainLayerNorm)


# precision.fp8 → megatron's TransformerConfig.fp8_recipe ("tensorwise" is TE's Float8CurrentScaling)
FP8_RECIPES = {"delayed": "delayed", "current": "tensorwise"}


def fp8_fields(fp8: str, fp8_format: str = "hybrid", amax_history_len: int = 1024) -> dict:
    """TransformerConfig fields of an FP8 setting (``precision.fp8``); {} for none. megatron-core's
    TransformerBlock reads them and enters TE's fp8_autocast around the layers itself
    (transformer_block.py:600-660): delayed scaling wraps the whole block once (its amax
    reduction must see every layer), current scaling wraps each layer."""
    if fp8 == "none":
        return {}
    if fp8 not in FP8_RECIPES:
        raise ValueError(f"unknown fp8 setting {fp8!r}; choose none, delayed or current")
    out = dict(fp8=fp8_format, fp8_recipe=FP8_RECIPES[fp8])
    if fp8 == "delayed":
        out.update(fp8_amax_history_len=amax_history_len, fp8_amax_compute_algo="max", fp8_margin=0)
    return out


def transformer_config(model: ModelConfig, parallel: ParallelConfig, *, dtype: torch.dtype,
                       batch_p2p_comm: bool, backend: Backend = "local", fp8: str = "none",
                       fp8_format: str = "hybrid", fp8_amax_history_len: int = 1024) -> TransformerConfig:
    """The megatron TransformerConfig of a recipe (DCLM choices spelled out). ``fp8`` is
    ``precision.fp8`` and needs the te backend."""
    if fp8 != "none" and backend != "te":
        raise RuntimeError(f"precision.fp8={fp8} needs the Transformer Engine backend (TE and a CUDA "
                           f"GPU); this run uses the {backend} layer spec")
    recompute = {"none": {}, "full": dict(recompute_granularity="full", recompute_method="uniform",
                                          recompute_num_layers=1),
                 "selective": dict(recompute_granularity="selective")}[parallel.recompute]
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        ffn_hidden_size=model.ffn_hidden_size,
        kv_channels=model.head_dim,
        add_bias_linear=False,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="LayerNorm",
        layernorm_epsilon=model.norm_eps,
        qk_layernorm=model.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        sequence_parallel=parallel.sequence_parallel,
        # TE allocates its weights where they will live; the local spec builds on CPU and moves
        use_cpu_initialization=backend != "te",
        perform_initialization=False,  # megavlm.model.init sets every weight, layout-independently
        calculate_per_token_loss=True,
        batch_p2p_comm=batch_p2p_comm,
        deallocate_pipeline_outputs=True,
        **recompute,
        **fp8_fields(fp8, fp8_format, fp8_amax_history_len),
    )
