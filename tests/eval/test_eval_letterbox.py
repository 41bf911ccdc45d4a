"""Evaluation encodes benchmark images as the checkpoint's training stores were made (issue 21,
item 3): a letterbox-trained checkpoint's images are letterboxed (checked on the pixels the real
encoder receives), the cache is keyed on encoder, size and resize, and a mismatch is an error."""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest
import torch
from PIL import Image

from megavlm.data.indexed import EmbeddingStore
from megavlm.encoders import ImageEncoder, ImageRecord, decode_pil, encode_images, mean_fill
from megavlm.eval import images
from megavlm.eval.runner import CheckpointModel, EvalError

RED = (230, 10, 10)


@pytest.fixture(scope="module")
def model(encoder_checkpoint):
    return CheckpointModel.load(encoder_checkpoint, batch_size=2)


def _wide(folder, name="wide.png"):
    folder.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((32, 96, 3), np.uint8)
    arr[:] = RED
    Image.fromarray(arr).save(folder / name)
    return name


def test_letterbox_trained_checkpoint_encodes_letterboxed(model, tmp_path, monkeypatch):
    enc = images.load_encoder(model)
    assert enc.resize == "letterbox" and images.recorded_encoding(model) == ("efficientnet-lite0", 64, "letterbox")
    seen = []
    call = ImageEncoder.__call__

    def spy(self, imgs):  # the real encoder runs; the pixels it was given are kept
        seen.append(np.array(imgs))
        return call(self, imgs)

    monkeypatch.setattr(ImageEncoder, "__call__", spy)
    name = _wide(tmp_path / "imgs")
    bank = images.cached_bank(tmp_path, tmp_path / "imgs", [name], enc)
    (px,) = np.concatenate(seen)
    fill = np.array(mean_fill(enc.mean))
    # 32 x 96 padded to 96 x 96 (32 rows of fill above and below), then resized to 64: bands of fill
    assert px.shape == (64, 64, 3)
    assert (np.abs(px[:18].astype(int) - fill).max(), np.abs(px[-18:].astype(int) - fill).max()) == (0, 0)
    assert np.abs(px[28:36].astype(int) - np.array(RED)).max() <= 2
    assert not np.array_equal(fill, RED)
    # the store is the letterboxed encoding, in the cache folder keyed on all three settings
    assert bank.prefix.parent.name == "efficientnet-lite0-64px-letterbox"
    assert EmbeddingStore(bank.prefix).meta.resize == "letterbox"
    monkeypatch.setattr(ImageEncoder, "__call__", call)
    data = (tmp_path / "imgs" / name).read_bytes()
    boxed = enc(decode_pil(data, 64, "", "letterbox", mean_fill(enc.mean))[None])[0]
    square = enc(decode_pil(data, 64)[None])[0]
    got = bank.store.get_tensor(0).float()
    assert torch.allclose(got, boxed, rtol=2e-2, atol=2e-2) and not torch.allclose(got, square, rtol=2e-2, atol=2e-2)


def test_cache_made_another_way_is_an_error(model, tmp_path):
    enc = images.load_encoder(model)
    name = _wide(tmp_path / "imgs")
    prefix = images.cache_prefix(tmp_path, enc, tmp_path / "imgs")
    prefix.parent.mkdir(parents=True)
    encode_images([ImageRecord(tmp_path / "imgs" / name, name, None, name)], str(prefix)[:-len(".embeds")], enc,
                  decoder="pil", progress=False, resize="square")
    with pytest.raises(EvalError, match=r"made by efficientnet-lite0 at 64px, square, but .* letterbox"):
        images.cached_bank(tmp_path, tmp_path / "imgs", [name], enc)


def _with(model, **vision):
    run = model.run
    v = dataclasses.replace(run.model.vision, **vision)
    return types.SimpleNamespace(run=dataclasses.replace(run, model=dataclasses.replace(run.model, vision=v)),
                                 path=model.path)


def test_resize_recorded_in_the_store_or_config(model, tmp_path):
    with pytest.raises(EvalError, match="records no image resize setting"):
        images.recorded_encoding(_with(model, resize=None))
    # a training caption store letterboxed: its record wins over an unset config, contradicts a square one
    enc = images.load_encoder(model)
    name = _wide(tmp_path / "imgs")
    encode_images([ImageRecord(tmp_path / "imgs" / name, name, None, name)], tmp_path / "caps", enc,
                  decoder="pil", progress=False, resize="letterbox")
    m = _with(model, resize=None)
    m.run = dataclasses.replace(m.run, data=dataclasses.replace(m.run.data, root=str(tmp_path), captions=["caps"]))
    assert images.recorded_encoding(m)[2] == "letterbox"
    m.run = dataclasses.replace(m.run, model=_with(model, resize="square").run.model)
    with pytest.raises(EvalError, match="model.vision.resize=square but its training store was resized letterbox"):
        images.recorded_encoding(m)
