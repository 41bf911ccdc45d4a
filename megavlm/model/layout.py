"""The one map between global parameter names / full tensors and this rank's TP shards.

Why one module: megatron splits each parameter across the tensor-parallel group in its own way,
and the same arithmetic is needed by layout-independent initialisation (megavlm.model.init),
OpenLM import (megavlm.model.openlm_io), gathering full tensors (megavlm.model.export) and the
conversion to and from OpenLM names (megavlm.model.reference). A layout change (GQA, tied
embeddings) is then one edit here, checked by tests/model/test_layout.py.

Names are *global*: ``decoder.layers.<global layer>.…`` whatever the pipeline layout
(:func:`global_name` maps a chunk's local names). The shard of each kind:

* ``vocab`` (embedding, output layer) and ``column`` (projector fc1 weight and bias): contiguous
  rows, dim 0.
* ``row`` (attention out projection, SwiGLU down projection, projector fc2 weight): contiguous
  columns, dim 1.
* ``qkv``: megatron's fused QKV weight [3d, d] has its rows grouped per head, ``[q_h; k_h; v_h]``
  for each head h (:func:`fuse_qkv` / :func:`split_qkv`), so a contiguous dim-0 split gives each
  rank whole heads.
* ``glu``: the SwiGLU fc1 weight is ``[gate; up]`` in full, and each rank holds
  ``[gate shard; up shard]`` (silu applies to the first half of the local output).
* ``qk_gain``: the full-width qk-norm gain (one gain over heads·head_dim) split like the heads.
* ``replicated``: the gain-only LayerNorms and the projector fc2 bias.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import Tensor

Kind = Literal["replicated", "vocab", "column", "row", "qkv", "glu", "qk_gain"]

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

_TOP: dict[str, Kind] = {
    "embedding.word_embeddings.weight": "vocab",
    "output_layer.weight": "vocab",
    "decoder.final_layernorm.weight": "replicated",
    "projector.fc1.weight": "column",
    "projector.fc1.bias": "column",
    "projector.fc2.weight": "row",
    "projector.fc2.bias": "replicated",
}
_PER_LAYER: dict[str, Kind] = {
    "input_layernorm.weight": "replicated",
    "pre_mlp_layernorm.weight": "replicated",
    "self_attention.linear_qkv.weight": "qkv",
    "self_attention.linear_proj.weight": "row",
    "self_attention.q_layernorm.weight": "qk_gain",
    "self_attention.k_layernorm.weight": "qk_gain",
    "mlp.linear_fc1.weight": "glu",
    "mlp.linear_fc2.weight": "row",
}
_DIM = {"vocab": 0, "column": 0, "qkv": 0, "glu": 0, "qk_gain": 0, "row": 1}


@dataclass(frozen=True)
class Placement:
    """How one global parameter is split across the tensor-parallel group."""

    name: str
    kind: Kind

    @property
    def dim(self) -> int | None:
        """The split dimension (None when replicated)."""
        return _DIM.get(self.kind)


def placement(name: str) -> Placement:
    """The placement of a global parameter name; KeyError naming it when the layout has no rule
    (a new parameter must be given one here, not guessed)."""
    kind = _TOP.get(name)
    if kind is None:
        m = _LAYER.match(name)
        kind = _PER_LAYER.get(m.group(2)) if m else None
    if kind is None:
        raise KeyError(f"megavlm.model.layout has no shard rule for parameter {name!r}")
    return Placement(name, kind)


def _check_divisible(name: str, full: Tensor, dim: int, tp_size: int, parts: int = 1) -> None:
    if full.shape[dim] % (tp_size * parts):
        raise ValueError(f"{name}: dim {dim} of shape {tuple(full.shape)} does not split into "
                         f"{tp_size} tensor-parallel shards")


def shard(name: str, full: Tensor, tp_rank: int, tp_size: int) -> Tensor:
    """This rank's shard of the full tensor of global parameter ``name``."""
    p = placement(name)
    if p.dim is None or tp_size == 1:
        return full
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} outside a tensor-parallel group of {tp_size}")
    if p.kind == "glu":
        _check_divisible(name, full, 0, tp_size, parts=2)
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]])
    _check_divisible(name, full, p.dim, tp_size)
    return full.chunk(tp_size, dim=p.dim)[tp_rank]


def unshard(name: str, shards: Sequence[Tensor]) -> Tensor:
    """The full tensor of global parameter ``name`` from every rank's shard, in rank order
    (the inverse of :func:`shard`)."""
    p = placement(name)
    if p.dim is None or len(shards) == 1:
        return shards[0]
    if p.kind == "glu":
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    return torch.cat(list(shards), dim=p.dim)


def layer_and_suffix(name: str) -> tuple[int | None, str]:
    """(global layer index, per-layer suffix) of ``decoder.layers.<i>.<suffix>``; (None, name)
    for a parameter outside the decoder layers."""
    m = _LAYER.match(name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)


def global_name(local: str, layer_numbers: Sequence[int]) -> str:
    """A chunk's parameter name with its local layer index replaced by the global one.

    ``layer_numbers[i]`` is the 1-based global number of the chunk's i-th layer (megatron's
    ``TransformerLayer.layer_number``)."""
    m = _LAYER.match(local)
    if not m:
        return local
    return f"decoder.layers.{layer_numbers[int(m.group(1))] - 1}.{m.group(2)}"


def chunk_layer_numbers(chunk) -> list[int]:
    """The 1-based global layer numbers of a model chunk's decoder layers."""
    return [layer.layer_number for layer in chunk.decoder.layers]


def check_parameter(name: str, param: Tensor) -> None:
    """The layout's rule agrees with megatron's own tensor-parallel marks on the parameter."""
    p = placement(name)
    marked = bool(getattr(param, "tensor_model_parallel", False))
    if marked != (p.dim is not None) or (marked and param.partition_dim != p.dim):
        raise RuntimeError(f"{name}: megatron splits it on dim "
                           f"{param.partition_dim if marked else None}, the layout says {p.dim}")


# -------------------------------------------------------------------- fused full tensors


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """Whole [d, d] q, k, v projections → megatron's fused [3d, d], rows ``[q_h; k_h; v_h]`` per head."""
    d_out, d = q.shape
    if d_out % heads:
        raise ValueError(f"a QKV block of {d_out} rows does not split into {heads} heads")
    hd = d_out // heads
    return torch.stack([t.reshape(heads, hd, d) for t in (q, k, v)], dim=1).reshape(3 * d_out, d)


def split_qkv(fused: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of :func:`fuse_qkv`: megatron's per-head grouped rows → whole (q, k, v)."""
    three_d, d = fused.shape
    if three_d % (3 * heads):
        raise ValueError(f"a fused QKV of {three_d} rows does not split into 3 x {heads} heads")
    hd = three_d // (3 * heads)
    per_head = fused.reshape(heads, 3, hd, d)
    q, k, v = (per_head[:, j].reshape(heads * hd, d) for j in range(3))
    return q, k, v


def fuse_glu(gate: Tensor, up: Tensor) -> Tensor:
    """The full SwiGLU fc1 weight ``[gate; up]`` (silu applies to the first half)."""
    return torch.cat([gate, up], dim=0)
