"""The encoder's arithmetic when preparing stores (megavlm.prep.imageparts.on_worker_device):
float32 by default, bf16 autocast on request (about 7x the images/s on an H200)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megavlm.encoders import SiglipEncoder
from megavlm.prep.imageparts import OnDevice, on_worker_device


def tiny_siglip() -> SiglipEncoder:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, image_size=28, patch_size=14)
    return SiglipEncoder(model=transformers.SiglipVisionModel(cfg))


def test_bf16_compute_is_autocast_and_close_to_float32():
    enc = tiny_siglip()
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28, 3), dtype=np.uint8)
    want = enc(images)
    if not torch.cuda.is_available():
        assert on_worker_device(enc) is enc  # float32 on a CPU: the encoder itself
    got = on_worker_device(enc, "bfloat16")
    assert isinstance(got, OnDevice) and got.compute_dtype == "bfloat16" and got.name == enc.name
    out = got(images)
    assert out.dtype == torch.float32 and out.shape == want.shape == (3, 4, 32)
    rel = ((out - want).norm() / want.norm()).item()
    assert 0 < rel < 5e-2, rel  # bf16 arithmetic: not bitwise float32, within its rounding


def test_unknown_compute_dtype_is_refused():
    with pytest.raises(ValueError, match="not one of"):
        on_worker_device(tiny_siglip(), "float16")
