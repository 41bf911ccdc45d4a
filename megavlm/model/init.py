"""Weight initialisation that does not depend on the parallel layout.

Every parameter is drawn *whole* from a generator seeded by (run seed, parameter's global name),
then this rank keeps its tensor-parallel shard. The same seed therefore gives the same model at
TP=1, TP=2, PP=2 or interleaved PP — which is what lets the parity tests compare layouts and lets
a user change layout without changing the experiment.

Distributions follow OpenLM (DCLM): truncated normal at ±3σ with σ = 1/√d_model for embeddings,
output and input projections; the attention output projection and the SwiGLU down projection
(σ = 1/√ffn) are further scaled by 1/√(2(layer+1)); norm gains are 1, biases 0.
"""

from __future__ import annotations

import hashlib
import math
from typing import Iterable

import torch
from torch import Tensor

from megavlm.config import ModelConfig
from megavlm.model import layout


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _trunc_normal(shape: tuple[int, ...], std: float, seed: int, name: str) -> Tensor:
    t = torch.empty(shape, dtype=torch.float32)
    torch.nn.init.trunc_normal_(t, std=std, a=-3 * std, b=3 * std, generator=_generator(seed, name))
    return t


def _ones(n: int) -> Tensor:
    return torch.ones(n)


def full_tensor(name: str, model: ModelConfig, seed: int) -> Tensor:
    """The full (unsharded) initial value of the parameter with this global name.

    Layout-independent by construction: it depends on the name, the model config and the seed
    only. Raises KeyError for a name it has no rule for."""
    d, ffn, V = model.hidden_size, model.ffn_hidden_size, model.vocab_size
    heads = model.num_attention_heads
    std = model.init_std or 1.0 / math.sqrt(d)
    dv = model.vision.embed_dim
    hv = dv * model.vision.projector_mult
    top = {
        "embedding.word_embeddings.weight": lambda: _trunc_normal((V, d), std, seed, "embed"),
        "output_layer.weight": lambda: _trunc_normal((V, d), std, seed, "output"),
        "decoder.final_layernorm.weight": lambda: _ones(d),
        "projector.fc1.weight": lambda: _trunc_normal((hv, dv), 1 / math.sqrt(dv), seed, "projector.fc1"),
        "projector.fc1.bias": lambda: torch.zeros(hv),
        "projector.fc2.weight": lambda: _trunc_normal((d, hv), 1 / math.sqrt(hv), seed, "projector.fc2"),
        "projector.fc2.bias": lambda: torch.zeros(d),
    }
    if name in top:
        return top[name]()
    i, suffix = layout.layer_and_suffix(name)
    if i is None:
        raise KeyError(f"megavlm.model.init has no rule for parameter {name!r}")
    scale = 1.0 / math.sqrt(2 * (i + 1))
    if suffix in ("input_layernorm.weight", "pre_mlp_layernorm.weight") or (
            model.qk_norm and suffix in ("self_attention.q_layernorm.weight",
                                         "self_attention.k_layernorm.weight")):
        return _ones(d)  # the qk-norm gain is full width (heads x head_dim = d)
    if suffix == "self_attention.linear_qkv.weight":
        q, k, v = (_trunc_normal((d, d), std, seed, f"layers.{i}.attn.{w}") for w in "qkv")
        return layout.fuse_qkv(q, k, v, heads)
    if suffix == "self_attention.linear_proj.weight":
        return _trunc_normal((d, d), std * scale, seed, f"layers.{i}.attn.out")
    if suffix == "mlp.linear_fc1.weight":
        return layout.fuse_glu(_trunc_normal((ffn, d), std, seed, f"layers.{i}.mlp.gate"),
                               _trunc_normal((ffn, d), std, seed, f"layers.{i}.mlp.up"))
    if suffix == "mlp.linear_fc2.weight":
        return _trunc_normal((d, ffn), scale / math.sqrt(ffn), seed, f"layers.{i}.mlp.down")
    raise KeyError(f"megavlm.model.init has no rule for parameter {name!r}")


def initialize(chunks: Iterable[torch.nn.Module], model: ModelConfig, seed: int,
               tp_rank: int, tp_size: int) -> None:
    """Set every parameter of these model chunks (megavlm.model.vlm.VLM) to this rank's shard
    of its :func:`full_tensor`; raise on a parameter without a rule."""
    with torch.no_grad():
        for chunk in chunks:
            numbers = layout.chunk_layer_numbers(chunk)
            for local, param in chunk.named_parameters():
                name = layout.global_name(local, numbers)
                value = layout.shard(name, full_tensor(name, model, seed), tp_rank, tp_size)
                if tuple(param.shape) != tuple(value.shape):
                    raise RuntimeError(f"init shape mismatch for {name}: parameter "
                                       f"{tuple(param.shape)} vs shard {tuple(value.shape)}")
                param.copy_(value.to(param.dtype))
