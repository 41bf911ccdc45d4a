"""The DCLM / OpenLM decoder in plain PyTorch, under OpenLM's parameter names.

Why it exists: it is the *specification* the megatron-core model is checked against, written
without megatron (own attention on torch SDPA, own RoPE, gain-only LayerNorm, SwiGLU), so a
mistake in a layer spec, a fused-QKV layout or the full-width qk-norm shows up as a logit
mismatch instead of a quietly different model. The same module is the plain-PyTorch side of
``megavlm bench train`` (it is an ordinary trainable ``nn.Module``), and its names are OpenLM's
``open_lm/model.py`` state-dict keys, so :func:`to_openlm_names` / :func:`from_openlm_names`
are the seam for exporting to and importing from OpenLM / DCLM checkpoints.

Layout facts the converters encode (the arithmetic lives in megavlm.model.layout):

* megatron's fused QKV weight [3d, d] is grouped per head; OpenLM's ``in_proj`` is ``[q; k; v]``
  as three whole [d, d] blocks.
* megatron's full GLU ``linear_fc1`` is ``[gate; up]``, the same as OpenLM's ``w12`` (silu on the
  first half), so it is copied unchanged.
* qk-norm is ONE LayerNorm over the whole heads·head_dim vector (OpenLM's ``q_norm``/``k_norm``),
  not a per-head norm.

Image-text rows: the language model takes ``inputs_embeds`` (token embeddings with projected
images already placed in their slots), exactly as OpenLM's ``Transformer.forward`` does.
"""

from __future__ import annotations

import re
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megavlm.config import ModelConfig
from megavlm.model import layout


class GainOnlyLayerNorm(nn.Module):
    """LayerNorm with a learned gain and no bias (OpenLM's gain-only LayerNorm)."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, None, self.eps)


def rope_angles(position_ids: Tensor, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """(cos, sin) of shape [B, S, 1, head_dim] for explicit positions (they restart per packed
    document). Non-interleaved layout: frequency j drives dims j and j + head_dim/2."""
    exponent = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
    inv_freq = base ** (-exponent)
    angles = position_ids.to(torch.float32)[..., None] * inv_freq  # [B, S, hd/2]
    angles = torch.cat([angles, angles], dim=-1)[:, :, None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate [B, S, H, hd] by the angles: x·cos + rotate_half(x)·sin, halves (x1, x2) → (−x2, x1)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def document_mask(cu_seqlens: Tensor, batch: int, seq: int) -> Tensor:
    """[B, 1, S, S] bool, True where attention is *forbidden* (megatron's convention): causal and
    within one document, for documents ``cu_seqlens`` over the flattened B·S positions.

    The dense specification of packed attention: the tests and the old path of ``megavlm bench
    attention`` use it. Training never builds it (megavlm.model.attention attends per document)."""
    flat = torch.arange(batch * seq, device=cu_seqlens.device)
    doc = torch.searchsorted(cu_seqlens[1:].to(torch.int64), flat, right=True).view(batch, seq)
    causal = torch.ones(seq, seq, dtype=torch.bool, device=cu_seqlens.device).triu(1)
    return ((doc[:, :, None] != doc[:, None, :]) | causal).unsqueeze(1)


class Attention(nn.Module):
    """Causal multi-head self-attention with full-width qk-norm and RoPE, no biases."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads, self.head_dim, self.rope_base = cfg.num_attention_heads, cfg.head_dim, cfg.rope_base
        self.in_proj = nn.Linear(d, 3 * d, bias=False)
        self.out_proj = nn.Linear(d, d, bias=False)
        self.q_norm = GainOnlyLayerNorm(d, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = GainOnlyLayerNorm(d, cfg.norm_eps) if cfg.qk_norm else nn.Identity()

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], blocked: Optional[Tensor]) -> Tensor:
        B, S, _ = x.shape
        q, k, v = self.in_proj(x).chunk(3, dim=-1)
        q, k = self.q_norm(q), self.k_norm(k)  # over all heads at once, before the head split
        q, k, v = (t.view(B, S, self.heads, self.head_dim) for t in (q, k, v))
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, hd]
        if blocked is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=~blocked)
        return self.out_proj(out.transpose(1, 2).reshape(B, S, -1))


class SwiGLU(nn.Module):
    """w3(silu(gate) * up) with [gate; up] = w12(x)."""

    def __init__(self, d: int, ffn: int):
        super().__init__()
        self.w12 = nn.Linear(d, 2 * ffn, bias=False)
        self.w3 = nn.Linear(ffn, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then h + ffn(norm(h))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = GainOnlyLayerNorm(cfg.hidden_size, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = GainOnlyLayerNorm(cfg.hidden_size, cfg.norm_eps)
        self.feed_forward = SwiGLU(cfg.hidden_size, cfg.ffn_hidden_size)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], blocked: Optional[Tensor]) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rope, blocked)
        return h + self.feed_forward(self.ffn_norm(h))


def document_bounds(position_ids: Tensor) -> Tensor:
    """``cu_seqlens`` over the flattened B·S positions, derived from the position ids alone: a
    document starts wherever its position restarts at 0, and at every row start. Independent of
    the trainer's own boundaries, so ``document_mask(document_bounds(pos), B, S)`` checks them."""
    B, S = position_ids.shape
    starts = (position_ids == 0)
    starts[:, 0] = True
    flat = starts.reshape(-1).nonzero().flatten()
    end = torch.tensor([B * S], device=flat.device)
    return torch.cat([flat, end]).to(torch.int32)


class ReferenceDCLM(nn.Module):
    """The language model of a recipe (no projector), OpenLM parameter names, batch-first."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = GainOnlyLayerNorm(cfg.hidden_size, cfg.norm_eps)
        self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def hidden(self, tokens: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
               attention_mask: Optional[Tensor] = None, inputs_embeds: Optional[Tensor] = None) -> Tensor:
        """Final-normed hidden states [B, S, d].

        Args:
            tokens: [B, S] ids (or give ``inputs_embeds`` [B, S, d] instead, e.g. with images spliced).
            position_ids: [B, S] RoPE positions; None = 0..S-1 in every row.
            attention_mask: [B, 1, S, S] bool, True where attention is *forbidden* (megatron's
                convention; :func:`document_mask` builds it for packed rows); None = causal.
        """
        x = self.tok_embeddings(tokens) if inputs_embeds is None else inputs_embeds
        B, S = x.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(S, device=x.device).expand(B, S)
        rope = rope_angles(position_ids, self.cfg.head_dim, self.cfg.rope_base)
        for layer in self.layers:
            x = layer(x, rope, attention_mask)
        return self.norm(x)

    def forward(self, tokens: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                attention_mask: Optional[Tensor] = None, inputs_embeds: Optional[Tensor] = None) -> Tensor:
        """Logits [B, S, V] (see :meth:`hidden` for the arguments)."""
        return self.output(self.hidden(tokens, position_ids, attention_mask, inputs_embeds))


# ------------------------------------------------------------------------------ name conversion

_MEGATRON_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_OPENLM_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")

# per-layer megatron suffix → OpenLM suffix, for tensors that need no re-layout
_LAYER_RENAMES = {
    "input_layernorm.weight": "attention_norm.weight",
    "pre_mlp_layernorm.weight": "ffn_norm.weight",
    "self_attention.linear_proj.weight": "attention.out_proj.weight",
    "self_attention.q_layernorm.weight": "attention.q_norm.weight",
    "self_attention.k_layernorm.weight": "attention.k_norm.weight",
    "mlp.linear_fc1.weight": "feed_forward.w12.weight",  # both [gate; up]
    "mlp.linear_fc2.weight": "feed_forward.w3.weight",
}
_TOP_RENAMES = {
    "embedding.word_embeddings.weight": "tok_embeddings.weight",
    "decoder.final_layernorm.weight": "norm.weight",
    "output_layer.weight": "output.weight",
}
_QKV = "self_attention.linear_qkv.weight"


def qkv_megatron_to_openlm(w: Tensor, heads: int) -> Tensor:
    """megatron's per-head grouped fused QKV (megavlm.model.layout) → OpenLM's [q; k; v] blocks."""
    return torch.cat(layout.split_qkv(w, heads), dim=0)


def qkv_openlm_to_megatron(w: Tensor, heads: int) -> Tensor:
    """Inverse of :func:`qkv_megatron_to_openlm`."""
    if w.shape[0] % 3:
        raise ValueError(f"OpenLM in_proj has {w.shape[0]} rows, not 3 blocks")
    return layout.fuse_qkv(*w.chunk(3, dim=0), heads=heads)


def _expected_openlm_keys(cfg: ModelConfig) -> set[str]:
    keys = set(_TOP_RENAMES.values())
    for i in range(cfg.num_layers):
        for suffix in list(_LAYER_RENAMES.values()) + ["attention.in_proj.weight"]:
            if "_norm.weight" in suffix and suffix.startswith("attention.") and not cfg.qk_norm:
                continue
            keys.add(f"layers.{i}.{suffix}")
    return keys


def to_openlm_names(full: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """megavlm's full tensors (megavlm.model.export.full_tensors, global megatron names) → an
    OpenLM state dict of the language model. Projector tensors are left out; any other name this
    does not know, or a missing one, is an error (a silent skip would hide a layout change)."""
    out: dict[str, Tensor] = {}
    for name, t in full.items():
        if name.startswith("projector."):
            continue
        if name in _TOP_RENAMES:
            out[_TOP_RENAMES[name]] = t
            continue
        m = _MEGATRON_LAYER.match(name)
        if m is None or (m.group(2) != _QKV and m.group(2) not in _LAYER_RENAMES):
            raise KeyError(f"to_openlm_names: no OpenLM name for megatron tensor {name!r}")
        i, suffix = m.group(1), m.group(2)
        if suffix == _QKV:
            out[f"layers.{i}.attention.in_proj.weight"] = qkv_megatron_to_openlm(t, cfg.num_attention_heads)
        else:
            out[f"layers.{i}.{_LAYER_RENAMES[suffix]}"] = t
    missing = _expected_openlm_keys(cfg) - set(out)
    if missing:
        raise KeyError(f"to_openlm_names: megatron tensors missing for {sorted(missing)[:5]}"
                       + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    return out


def from_openlm_names(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """An OpenLM state dict → megavlm's global megatron names (language model only)."""
    top = {v: k for k, v in _TOP_RENAMES.items()}
    layer = {v: k for k, v in _LAYER_RENAMES.items()}
    out: dict[str, Tensor] = {}
    for name, t in state.items():
        if name in top:
            out[top[name]] = t
            continue
        m = _OPENLM_LAYER.match(name)
        if m is None or (m.group(2) != "attention.in_proj.weight" and m.group(2) not in layer):
            raise KeyError(f"from_openlm_names: unknown OpenLM tensor {name!r}")
        i, suffix = m.group(1), m.group(2)
        if suffix == "attention.in_proj.weight":
            out[f"decoder.layers.{i}.{_QKV}"] = qkv_openlm_to_megatron(t, cfg.num_attention_heads)
        else:
            out[f"decoder.layers.{i}.{layer[suffix]}"] = t
    return out


def reference_from_megatron(full: dict[str, Tensor], cfg: ModelConfig) -> ReferenceDCLM:
    """A ReferenceDCLM holding exactly the language-model weights of a megavlm model."""
    model = ReferenceDCLM(cfg)
    model.load_state_dict(to_openlm_names(full, cfg), strict=True)
    return model


def num_parameters(cfg: ModelConfig, *, qk_norm_gains: bool = True) -> int:
    """Closed-form parameter count of the language model (DCLM's published figures exclude the
    qk-norm gains): untied embedding and output, per layer QKV + out + SwiGLU + two norms."""
    d, f, V, L = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size, cfg.num_layers
    per_layer = 4 * d * d + 3 * d * f + 2 * d + (2 * d if cfg.qk_norm and qk_norm_gains else 0)
    return 2 * V * d + L * per_layer + d
