"""LLaVA-665k-style conversations with --image-root: images encoded by key, text-only and multi-turn
records kept, a missing image named (file, record, id) before any work or dropped and listed."""
from __future__ import annotations

import json

import numpy as np
import pytest

from megavlm.data.indexed import DataError, EmbeddingStore
from megavlm.data.sources import ConversationSource
from tests.prep.test_readers_webdataset import img_bytes, siglip_dir  # noqa: F401
from tools import encode_images, preprocess_conversations as tool


def turn(h, g):
    return [{"from": "human", "value": h}, {"from": "gpt", "value": g}]


@pytest.fixture
def llava(tmp_path):
    root = tmp_path / "images"
    (root / "coco/train2017").mkdir(parents=True)
    (root / "gqa/images").mkdir(parents=True)
    (root / "coco/train2017/000000000009.jpg").write_bytes(img_bytes(1, "JPEG"))
    (root / "gqa/images/2354786.jpg").write_bytes(img_bytes(2, "JPEG"))
    recs = [{"id": "a", "image": "coco/train2017/000000000009.jpg",
             "conversations": turn("<image>\nWhat is this?", "A plate.") + turn("Colour?", "Red.")},
            {"id": "b", "conversations": turn("Say hi.", "Hi.")},  # text-only
            {"id": "c", "image": "gqa/images/2354786.jpg", "conversations": turn("<image>\nWhere?", "Left.")},
            {"id": "d", "image": "coco/train2017/000000000009.jpg", "conversations": turn("<image>\nAgain?", "Yes.")}]
    (tmp_path / "llava.json").write_text(json.dumps(recs))
    return tmp_path, root, recs


def test_llava_with_image_root_end_to_end(llava, siglip_dir, sp_model, tok):  # noqa: F811
    d, root, recs = llava
    assert encode_images.main(["--input", str(d / "llava.json"), "--image-root", str(root), "--no-captions",
                               "--output", str(d / "imgs"), "--encoder", f"siglip:{siglip_dir}",
                               "--decoder", "pil", "--no-progress"]) == 0
    store = EmbeddingStore(d / "imgs.embeds")
    assert store.meta.keys == ["coco/train2017/000000000009.jpg", "gqa/images/2354786.jpg"]  # distinct, first use
    assert tool.main(["--input", str(d / "llava.json"), "--image-root", str(root), "--tokenizer", str(sp_model),
                      "--embeds", str(d / "imgs"), "--output", str(d / "inst")]) == 0
    assert np.load(d / "inst.images.npy").tolist() == [0, -1, 1, 0]
    src = ConversationSource(d / "inst", tok, embed_dim=24, num_patches=16, seq_length=256)
    s0 = src.sample(0)
    assert s0.image.shape == (16, 24) and int(s0.target.sum()) == len(tok.encode("A plate.")) + len(tok.encode("Red.")) + 3
    assert src.sample(1).image is None


def test_missing_image_is_named_or_skipped(llava, sp_model):
    d, root, recs = llava
    (root / "gqa/images/2354786.jpg").unlink()
    args = ["--input", str(d / "llava.json"), "--image-root", str(root), "--tokenizer", str(sp_model),
            "--output", str(d / "inst")]
    from megavlm.prep.readers.llava import check_images
    with pytest.raises(DataError, match=r"llava\.json: record 2 \(id c\): image 'gqa/images/2354786\.jpg' "
                                        r"not found under"):
        check_images([d / "llava.json"], root)
    assert tool.main(args) == 1
    assert not list(d.glob("inst*"))
    # skip: record c dropped and listed; no embeds needed for the check itself (text-only kept)
    recs2 = [r for r in recs if r.get("image") != "coco/train2017/000000000009.jpg"]
    (d / "l2.json").write_text(json.dumps(recs2))
    assert tool.main(["--input", str(d / "l2.json"), "--image-root", str(root), "--tokenizer", str(sp_model),
                      "--output", str(d / "inst"), "--bad-input", "skip"]) == 0
    assert np.load(d / "inst.images.npy").tolist() == [-1]
    rej = [json.loads(x)["problem"] for x in (d / "inst.rejects.jsonl").read_text().splitlines()]
    assert len(rej) == 1 and "record 1 (id c)" in rej[0]
    assert not [p for p in d.iterdir() if p.name.startswith(".inst.")]  # the filtered copies are gone
    with pytest.raises(DataError, match="1 conversation image"):
        from megavlm.prep.readers.llava import image_records
        image_records([d / "l2.json"], root)
