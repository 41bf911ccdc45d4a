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


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _trunc_normal(shape: tuple[int, ...], std: float, seed: int, name: str) -> Tensor:
    t = torch.empty(shape, dtype=torch.float32)
    torch.nn.init.trunc_normal_(t, std=std, a=-3 * std, b=3 * std, generator=_generator(seed, name))
    return t


def _shard(full: Tensor, dim: int, rank: int, size: int) -> Tensor:
    return full.chunk(size, dim=dim)[rank]


class _Filler:
    def __init__(self, seed: int, tp_rank: int, tp_size: int):
        self.seed, self.rank, self.size = seed, tp_rank, tp_size
        self.done: set[int] = set()

    def set(self, param: Tensor, value: Tensor) -> None:
        if tuple(param.shape) != tuple(value.shape):
            raise RuntimeError(f"init shape mismatch: parameter {tuple(param.shape)} vs {tuple(value.shape)}")
        with torch.no_grad():
            param.copy_(value.to(param.dtype))
        self.done.add(id(param))

    def normal(self, param: Tensor, name: str, full_shape, std: float, shard_dim=None) -> None:
        full = _trunc_normal(tuple(full_shape), std, self.seed, name)
        self.set(param, full if shard_dim is None else _shard(full, shard_dim, self.rank, self.size))

    def const(self, param: Tensor, value: float) -> None:
        self.set(param, torch.full(tuple(param.shape), value))


def initialize(chunks: Iterable[torch.nn.Module], model: ModelConfig, seed: int,
               tp_rank: int, tp_size: int) -> None:
    """Set every parameter of these model chunks (megavlm.model.vlm.VLM); raise on any left over."""
    d, ffn, V = model.hidden_size, model.ffn_hidden_size, model.vocab_size
    heads, hd = model.num_attention_heads, model.head_dim
    std = model.init_std or 1.0 / math.sqrt(d)
    f = _Filler(seed, tp_rank, tp_size)
    chunks = list(chunks)
    for chunk in chunks:
        if chunk.pre_process:
            f.normal(chunk.embedding.word_embeddings.weight, "embed", (V, d), std, shard_dim=0)
            p = chunk.projector
            dv, hv = model.vision.embed_dim, model.vision.embed_dim * model.vision.projector_mult
            f.normal(p.fc1.weight, "projector.fc1", (hv, dv), 1 / math.sqrt(dv), shard_dim=0)
            f.const(p.fc1.bias, 0.0)
            f.normal(p.fc2.weight, "projector.fc2", (d, hv), 1 / math.sqrt(hv), shard_dim=1)
            f.const(p.fc2.bias, 0.0)
        for layer in chunk.decoder.layers:
            i = layer.layer_number - 1  # global, whatever the pipeline layout
            scale = 1.0 / math.sqrt(2 * (i + 1))
            f.const(layer.input_layernorm.weight, 1.0)
            f.const(layer.pre_mlp_layernorm.weight, 1.0)
            att = layer.self_attention
            q, k, v = (_trunc_normal((d, d), std, seed, f"layers.{i}.attn.{w}") for w in "qkv")
            # megatron's fused QKV rows are grouped per head: [q_h; k_h; v_h] for each head h
            qkv = torch.stack([t.view(heads, hd, d) for t in (q, k, v)], dim=1).reshape(3 * d, d)
            f.set(att.linear_qkv.weight, _shard(qkv, 0, tp_rank, tp_size))
            f.normal(att.linear_proj.weight, f"layers.{i}.attn.out", (d, d), std * scale, shard_dim=1)
            if model.qk_norm:
                f.const(att.q_layernorm.weight, 1.0)
                f.const(att.k_layernorm.weight, 1.0)
            mlp = layer.mlp
            gate = _trunc_normal((ffn, d), std, seed, f"layers.{i}.mlp.gate")
            up = _trunc_normal((ffn, d), std, seed, f"layers.{i}.mlp.up")
            # megatron's GLU fc1 shard = [gate shard; up shard]; silu applies to the first half
            f.set(mlp.linear_fc1.weight, torch.cat([_shard(gate, 0, tp_rank, tp_size),
                                                    _shard(up, 0, tp_rank, tp_size)]))
            f.normal(mlp.linear_fc2.weight, f"layers.{i}.mlp.down", (d, ffn),
                     scale / math.sqrt(ffn), shard_dim=1)
        if chunk.post_process:
            f.const(chunk.decoder.final_layernorm.weight, 1.0)
            f.normal(chunk.output_layer.weight, "output", (V, d), std, shard_dim=0)
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            if id(param) not in f.done:
                raise RuntimeError(f"megavlm.model.init has no rule for parameter {name}")
