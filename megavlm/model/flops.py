"""Model FLOPs of a megavlm ModelConfig: what MFU is measured against.

Why its own module: MFU is only comparable when the FLOP count is stated. This one follows the
convention of the anchors we compare with (PaLM appendix B, Megatron-LM's and llm-foundry's MFU):

* **Matmul FLOPs only**, 2 per multiply-add. Norms, activations, softmax, RoPE, the embedding
  lookup and the optimizer are not counted.
* **Training = 3 × forward**: the backward pass computes a data gradient and a weight gradient for
  every matmul (2 × forward). Recomputation is *not* counted (it is hardware FLOPs, not model
  FLOPs), so full recompute lowers MFU, as it should.
* Per position, forward, one layer (d = hidden, f = SwiGLU width):
  QKV 2·d·3d + attention output 2·d·d + SwiGLU (gate+up 2·d·2f, down 2·f·d)
  = **8·d² + 6·d·f**.
* **Attention** (scores QKᵀ and the weighted sum AV), forward, per position, one layer:
  2·d per context position for each of the two products. ``attention="full"`` (default, the
  anchors' convention) counts the whole row as context: **4·d·S**, i.e. 12·L·d·S per trained
  token. ``attention="causal"`` counts only the positions a causal query really sees, on average
  (S+1)/2: **2·d·(S+1)**. Packed documents are counted like one row either way.
* **Output layer**: 2·d·V per position *that carries a loss*. megavlm computes logits only there
  (megavlm.ops.masked_ce), so image positions and masked prompt positions cost no logits. For a
  text row every position but the padded ones has a loss.
* **Projector** (per image position): Linear(d_v, m·d_v) and Linear(m·d_v, d):
  2·d_v·m·d_v + 2·m·d_v·d. Image positions go through the decoder like text positions.

For plain text this is 6·N + 12·L·d·S per token with N the matmul parameters
(L·(4d² + 3df) + dV), the formula behind the anchors' MFU numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megavlm.config import ModelConfig

Attention = Literal["full", "causal"]
TRAIN_MULTIPLIER = 3  # forward + backward (data and weight gradients)


def layer_matmul_flops(cfg: ModelConfig) -> int:
    """Forward matmul FLOPs of all decoder layers, per position, without attention scores."""
    d, f = cfg.hidden_size, cfg.ffn_hidden_size
    return cfg.num_layers * (8 * d * d + 6 * d * f)


def attention_flops(cfg: ModelConfig, seq: int, attention: Attention = "full") -> int:
    """Forward FLOPs of QKᵀ and AV of all layers, per position, in a row of ``seq`` positions."""
    d, L = cfg.hidden_size, cfg.num_layers
    if attention == "full":
        return 4 * L * d * seq
    if attention == "causal":
        return 2 * L * d * (seq + 1)
    raise ValueError(f"attention must be 'full' or 'causal', not {attention!r}")


def logits_flops(cfg: ModelConfig) -> int:
    """Forward FLOPs of the output layer per loss position."""
    return 2 * cfg.hidden_size * cfg.vocab_size


def projector_flops(cfg: ModelConfig) -> int:
    """Forward FLOPs of the projector per image position."""
    dv, m, d = cfg.vision.embed_dim, cfg.vision.projector_mult, cfg.hidden_size
    return 2 * dv * (m * dv) + 2 * (m * dv) * d


@dataclass(frozen=True)
class RowMix:
    """What a set of rows holds: positions in all, how many carry a loss, how many are image patches."""

    positions: int
    loss_positions: int
    image_positions: int = 0

    def __post_init__(self):
        if not 0 <= self.loss_positions <= self.positions or not 0 <= self.image_positions <= self.positions:
            raise ValueError(f"inconsistent row mix {self}")


def forward_flops(cfg: ModelConfig, mix: RowMix, seq: int, attention: Attention = "full") -> int:
    """Forward model FLOPs of rows of length ``seq`` holding ``mix``."""
    per_position = layer_matmul_flops(cfg) + attention_flops(cfg, seq, attention)
    return (mix.positions * per_position + mix.loss_positions * logits_flops(cfg)
            + mix.image_positions * projector_flops(cfg))


def training_flops(cfg: ModelConfig, mix: RowMix, seq: int, attention: Attention = "full") -> int:
    """Training (forward + backward) model FLOPs of ``mix``: 3 × forward."""
    return TRAIN_MULTIPLIER * forward_flops(cfg, mix, seq, attention)


def text_flops_per_token(cfg: ModelConfig, seq: int | None = None, attention: Attention = "full") -> float:
    """Training FLOPs per position of full text rows (every position has a loss)."""
    seq = seq or cfg.seq_length
    return training_flops(cfg, RowMix(seq, seq), seq, attention) / seq


def caption_row_mix(cfg: ModelConfig, seq: int | None = None) -> RowMix:
    """One caption row as the image-text benchmark feeds it: ``num_patches`` image positions,
    then SEP and text to the end of the row. Every position from SEP to the second-to-last
    predicts a text token (the last has no label in the row)."""
    seq = seq or cfg.seq_length
    P = cfg.vision.num_patches
    if P + 2 > seq:
        raise ValueError(f"{P} image positions do not fit a row of {seq} with text")
    return RowMix(positions=seq, loss_positions=seq - P - 1, image_positions=P)


def caption_flops_per_token(cfg: ModelConfig, seq: int | None = None, attention: Attention = "full") -> float:
    """Training FLOPs per position (image positions included) of caption rows."""
    seq = seq or cfg.seq_length
    return training_flops(cfg, caption_row_mix(cfg, seq), seq, attention) / seq
