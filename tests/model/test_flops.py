"""The FLOP count against numbers worked out by hand, and against 6·N + 12·L·d·S.

The hand numbers are written out term by term in the comments so a wrong factor anywhere
(3× for training, 2 per multiply-add, causal halving, logits only at loss positions, the
projector only at image positions) changes a literal, not just a formula shared with the code.
"""

from __future__ import annotations

import pytest

from megavlm.config import ModelConfig, VisionConfig
from megavlm.model import flops
from megavlm.model.reference import num_parameters


def small() -> ModelConfig:
    return ModelConfig(num_layers=2, hidden_size=8, num_attention_heads=2, ffn_hidden_size=16,
                       vocab_size=32, seq_length=4,
                       vision=VisionConfig(embed_dim=4, num_patches=2, projector_mult=2))


def dclm_1b() -> ModelConfig:
    return ModelConfig(num_layers=24, hidden_size=2048, num_attention_heads=16, ffn_hidden_size=5632,
                       vocab_size=50432, seq_length=2048,
                       vision=VisionConfig(embed_dim=1152, num_patches=729, projector_mult=4))


def test_small_by_hand():
    c = small()
    # per layer 8*8*8 + 6*8*16 = 512 + 768 = 1280; two layers
    assert flops.layer_matmul_flops(c) == 2560
    # QK^T and AV over a full row of 4: 4 * L2 * d8 * S4
    assert flops.attention_flops(c, 4) == 256
    # causal: 2 * 2 * 8 * (4 + 1)
    assert flops.attention_flops(c, 4, "causal") == 160
    assert flops.logits_flops(c) == 512          # 2 * 8 * 32
    assert flops.projector_flops(c) == 192       # 2*4*(2*4) + 2*(2*4)*8 = 64 + 128
    # text: 3 * (2560 + 256 + 512)
    assert flops.text_flops_per_token(c) == 9984
    # caption row of 4: 2 image positions, SEP, one text; loss at SEP only (4 - 2 - 1 = 1)
    mix = flops.caption_row_mix(c)
    assert mix == flops.RowMix(positions=4, loss_positions=1, image_positions=2)
    # 3 * (4*(2560+256) + 1*512 + 2*192) = 3 * 12160
    assert flops.training_flops(c, mix, 4) == 36480
    assert flops.caption_flops_per_token(c) == 9120


def test_dclm_1b_by_hand():
    c = dclm_1b()
    # layers: 24 * (8*2048^2 + 6*2048*5632) = 24 * 102,760,448
    assert flops.layer_matmul_flops(c) == 2_466_250_752
    assert flops.attention_flops(c, 2048) == 402_653_184            # 4*24*2048*2048
    assert flops.logits_flops(c) == 206_569_472                     # 2*2048*50432
    # 3 * (2,466,250,752 + 402,653,184 + 206,569,472) = 9.226 GFLOP per token
    assert flops.text_flops_per_token(c) == 9_226_420_224
    # causal attention 2*24*2048*2049 = 201,424,896 instead
    assert flops.text_flops_per_token(c, attention="causal") == 8_622_735_360
    # caption row: 2048 positions, 729 image, 1318 loss; projector 2*1152*4608 + 2*4608*2048
    assert flops.projector_flops(c) == 29_491_200
    row = 3 * (2048 * (2_466_250_752 + 402_653_184) + 1318 * 206_569_472 + 729 * 29_491_200)
    assert row == 18_507_818_729_472
    assert flops.training_flops(c, flops.caption_row_mix(c), 2048) == row
    # a caption row is cheaper per position than text: fewer logits, projector is small
    assert flops.caption_flops_per_token(c) < flops.text_flops_per_token(c)


@pytest.mark.parametrize("make", [small, dclm_1b])
def test_text_is_six_n_plus_attention(make):
    """Independent route: N from the reference model's parameter count (embedding and norm gains
    removed) → 6·N + 12·L·d·S per token."""
    c = make()
    n = num_parameters(c, qk_norm_gains=False) - c.vocab_size * c.hidden_size \
        - (2 * c.num_layers + 1) * c.hidden_size
    S = c.seq_length
    assert flops.text_flops_per_token(c) == 6 * n + 12 * c.num_layers * c.hidden_size * S


def test_bad_inputs():
    c = small()
    with pytest.raises(ValueError):
        flops.attention_flops(c, 4, "sliding")
    with pytest.raises(ValueError):
        flops.RowMix(positions=4, loss_positions=5)
    with pytest.raises(ValueError):
        flops.caption_row_mix(c, seq=3)
