"""Fused encoders (issue 21, item 5; Table 5's DINOv2 + SigLIP as Prismatic fuses them), on tiny
random transformers models built offline: the store's width is the sum of the parts' widths,
features in the order given; mismatched patch grids are refused; tools/encode_images.py takes
--encoder a+b."""

from __future__ import annotations

import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import torch

from megavlm.data.indexed import EmbeddingStore
from megavlm.encoders import (Dinov2Encoder, FusedEncoder, SiglipEncoder, decode_pil, encode_images, make_encoder,
                              mean_fill, read_image_list)
from tests.prep.test_encoders import make_images

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(find_spec("transformers") is None, reason="transformers not installed")


def _dino(image_size=32, patch=8, hidden=16):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(1)
    return Dinov2Model(Dinov2Config(hidden_size=hidden, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    image_size=image_size, patch_size=patch))


def _siglip(image_size=32, patch=8, hidden=24):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(2)
    return SiglipVisionModel(SiglipVisionConfig(hidden_size=hidden, intermediate_size=48, num_hidden_layers=1,
                                                num_attention_heads=2, image_size=image_size, patch_size=patch))


def test_fused_width_and_order(tmp_path):
    dino, sig = Dinov2Encoder(model=_dino(), image_size=32), SiglipEncoder(model=_siglip())
    fused = FusedEncoder([dino, sig])
    assert (fused.num_patches, fused.embed_dim, fused.widths) == (16, 16 + 24, (16, 24))
    assert fused.name == f"{dino.name}+{sig.name}" and fused.mean == dino.mean  # DINOv2's fill, as Prismatic
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    out = fused(imgs)
    assert out.shape == (3, 16, 40)
    # each part with its own normalisation, [dino | siglip] along the width
    assert torch.equal(out[..., :16], dino(imgs)) and torch.equal(out[..., 16:], sig(imgs))
    assert not torch.allclose(out[..., :16], out[..., 24:])  # the halves are different features
    # a store built with the fused encoder records the fused name and the summed width
    recs = make_images(tmp_path / "imgs", 3, size=40)
    (tmp_path / "imgs/caps.jsonl").write_text("\n".join(f'{{"image": "{r["image"]}"}}' for r in recs))
    records = read_image_list(tmp_path / "imgs/caps.jsonl", captions=False)
    encode_images(records, tmp_path / "fused", fused, decoder="pil", progress=False)
    st = EmbeddingStore(tmp_path / "fused.embeds")
    assert (st.meta.encoder, st.meta.embed_dim, st.meta.num_patches, st.meta.resize) == (fused.name, 40, 16, "letterbox")
    px = decode_pil(records[1].path.read_bytes(), 32, "", "letterbox", mean_fill(dino.mean))[None]
    got = st.get_tensor(1).float()
    assert torch.allclose(got[:, :16], dino(px)[0], rtol=2e-2, atol=2e-2)
    assert torch.allclose(got[:, 16:], sig(px)[0], rtol=2e-2, atol=2e-2)


def test_grid_mismatch_is_refused():
    sig = SiglipEncoder(model=_siglip())  # 4 x 4 patches at 32 px
    with pytest.raises(ValueError, match="matching patch grids.*4 patches at 32px.*16 patches at 32px"):
        FusedEncoder([Dinov2Encoder(model=_dino(patch=16), image_size=32), sig])
    with pytest.raises(ValueError, match="at least two"):
        FusedEncoder([sig])


def test_encode_images_tool_takes_a_plus_b(tmp_path):
    _dino().save_pretrained(tmp_path / "dino")
    _siglip().save_pretrained(tmp_path / "sig")
    spec = f"dinov2:{tmp_path / 'dino'}+siglip:{tmp_path / 'sig'}"
    enc = make_encoder(spec)  # DINOv2 runs at SigLIP's size
    assert isinstance(enc, FusedEncoder) and (enc.image_size, enc.num_patches, enc.embed_dim) == (32, 16, 40)
    make_images(tmp_path / "imgs", 2, size=48)
    for i in range(2):
        (tmp_path / f"imgs/im{i}.txt").write_text(f"a cat {i}\n")
    r = subprocess.run([sys.executable, str(ROOT / "tools/encode_images.py"), "--input", str(tmp_path / "imgs"),
                        "--output", str(tmp_path / "out"), "--encoder", spec, "--no-captions", "--decoder", "pil",
                        "--no-progress"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    st = EmbeddingStore(tmp_path / "out.embeds")
    assert (st.meta.encoder, st.meta.embed_dim, len(st)) == (enc.name, 40, 2)
    _dino(patch=16).save_pretrained(tmp_path / "dino16")
    r = subprocess.run([sys.executable, str(ROOT / "tools/encode_images.py"), "--input", str(tmp_path / "imgs"),
                        "--output", str(tmp_path / "bad"), "--encoder", f"dinov2:{tmp_path / 'dino16'}+siglip:{tmp_path / 'sig'}",
                        "--no-captions", "--decoder", "pil", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "matching patch grids" in r.stderr
