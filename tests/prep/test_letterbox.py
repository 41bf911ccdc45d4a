"""Letterbox resizing (pad to square, then resize), its record in the store, and the refusal to
mix stores resized differently in one stage."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from megavlm.config import DataConfig, MixtureConfig, VisionConfig
from megavlm.encoders import decode_pil, letterbox, make_decoder, mean_fill
from megavlm.data.indexed import DataError, EmbeddingStore
from megavlm.data.mixture import LoaderSpec
from megavlm.train.plan import build_loader

from tests.data.conftest import write_caption_dataset


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_letterbox_pads_centred_with_fill():
    arr = np.full((2, 6, 3), 200, dtype=np.uint8)
    out = letterbox(arr, (1, 2, 3))
    assert out.shape == (6, 6, 3)
    assert (out[2:4] == 200).all()  # centred rows 2..3
    assert (out[:2] == [1, 2, 3]).all() and (out[4:] == [1, 2, 3]).all()
    odd = letterbox(np.zeros((3, 6, 3), np.uint8), (9, 9, 9))
    assert (odd[1:4] == 0).all() and (odd[0] == 9).all() and (odd[4:] == 9).all()  # extra row at the bottom
    sq = np.zeros((4, 4, 3), np.uint8)
    assert letterbox(sq, (5, 5, 5)) is sq
    assert mean_fill((0.5, 0.5, 0.5)) == (128, 128, 128)
    assert mean_fill((0.485, 0.456, 0.406)) == (124, 116, 104)


def test_decode_letterbox_keeps_aspect_square_stretches():
    img = np.zeros((20, 80, 3), dtype=np.uint8)
    img[:, :] = 255  # a white 1:4 strip
    data = _png(img)
    sq = decode_pil(data, 32, resize="square")
    lb = decode_pil(data, 32, resize="letterbox", fill=(0, 0, 0))
    assert sq.shape == lb.shape == (32, 32, 3)
    assert sq.min() > 200  # stretched: all white
    assert lb[0].max() < 30 and lb[-1].max() < 30 and lb[16].min() > 200  # bars above and below
    name, dec = make_decoder("auto", 32, 4, resize="letterbox", fill=(0, 0, 0))
    assert name == "pil" and np.array_equal(dec([data], ["x"])[0], lb)
    with pytest.raises(RuntimeError, match="square only"):
        make_decoder("dali", 32, 4, resize="letterbox")
    with pytest.raises(ValueError, match="resize"):
        make_decoder("pil", 32, 4, resize="crop")


def _set_resize(prefix, value):
    meta = json.loads(open(f"{prefix}.embeds.json").read())
    if value is None:
        meta.pop("resize", None)
    else:
        meta["resize"] = value
    open(f"{prefix}.embeds.json", "w").write(json.dumps(meta))


def test_store_records_resize_and_stage_refuses_mixing(corpus, tok, tmp_path):
    import shutil

    shutil.copy(corpus / "tokenizer.model", tmp_path / "tokenizer.model")
    shutil.copy(corpus / "text.bin", tmp_path / "text.bin")
    shutil.copy(corpus / "text.idx", tmp_path / "text.idx")
    for name in ("a", "b"):
        write_caption_dataset(tmp_path / name, tok, 20, P=4, D=8, seed=1)
    assert EmbeddingStore(tmp_path / "a.embeds").meta.resize == "square"  # writer default
    _set_resize(tmp_path / "a", None)  # an old store without the field counts as square
    assert EmbeddingStore(tmp_path / "a.embeds").meta.resize == "square"

    def loader():
        data = DataConfig(root=str(tmp_path), captions=["a", "b"])
        return build_loader(LoaderSpec(stage="img", data=data, mixture=MixtureConfig(text=0.5, captions=0.5),
                                       vision=VisionConfig(embed_dim=8, num_patches=4), seq_length=64, seed=1))

    assert loader().resize == "square"
    _set_resize(tmp_path / "b", "letterbox")
    with pytest.raises(DataError, match=r"resized differently.*letterbox.*square"):
        loader()
    _set_resize(tmp_path / "a", "letterbox")
    assert loader().resize == "letterbox"
