"""DALI (CPU backend, device_id=None; the same pipeline decodes on the GPU with device='mixed')
against PIL on the images of a WebDataset shard: jpg, png and webp decode + bicubic resize agree
within a stated tolerance — mean |diff| < 3 and 99th percentile < 24 of 255 per channel (the two
libraries' bicubic kernels and JPEG IDCTs differ slightly) — and the stores they lead to agree
(cosine > 0.99 per image). DALI resizes square only; letterbox (the paper's setting) is PIL's."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megavlm.data.indexed import EmbeddingStore
from megavlm.encoders import DaliDecoder, dali_available, decode_pil
from megavlm.prep.readers.webdataset import read_tar_shard
from tests.prep.test_readers_webdataset import _args, siglip_dir, write_shard  # noqa: F401
from tools import encode_images as tool

pytestmark = pytest.mark.skipif(not dali_available(), reason="nvidia-dali not installed")


def test_dali_decodes_tar_images_like_pil(tmp_path):
    write_shard(tmp_path / "s.tar", 0, 6)
    samples = read_tar_shard(tmp_path / "s.tar")
    dec = DaliDecoder(32, batch_size=3)
    outs = dec([s.image for s in samples], [s.where for s in samples])
    assert dec.fallbacks == 0  # jpg, png and webp all decoded by DALI itself
    for s, o in zip(samples, outs):
        ref = decode_pil(s.image, 32)
        diff = np.abs(o.astype(int) - ref.astype(int))
        assert o.shape == ref.shape == (32, 32, 3)
        assert diff.mean() < 3.0 and np.percentile(diff, 99) < 24, (s.key, diff.mean(), np.percentile(diff, 99))


def test_dali_and_pil_stores_agree(tmp_path, sp_model, siglip_dir):  # noqa: F811
    write_shard(tmp_path / "s.tar", 0, 6)
    base = _args(str(tmp_path / "s.tar"), sp_model, siglip_dir, tmp_path / "pil", "--resize", "square")
    assert tool.main(base) == 0
    dali = [x if x != "pil" else "dali" for x in _args(str(tmp_path / "s.tar"), sp_model, siglip_dir, tmp_path / "dali", "--resize", "square")]
    assert tool.main(dali) == 0
    a, b = EmbeddingStore(tmp_path / "pil.embeds"), EmbeddingStore(tmp_path / "dali.embeds")
    assert a.meta.keys == b.meta.keys
    for i in range(len(a)):
        x, y = a.get_tensor(i).float(), b.get_tensor(i).float()
        assert float(torch.nn.functional.cosine_similarity(x.flatten(), y.flatten(), dim=0)) > 0.99
