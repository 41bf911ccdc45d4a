"""WebDataset tar shards (built with webdataset's own TarWriter and tarfile) through
tools/encode_images.py: jpg/png/webp, txt or JSON captions with a recorded deterministic choice,
parallel parts == one worker, and every bad input named (shard + member key) or skipped and listed."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from megavlm.data.indexed import DataError, EmbeddingStore, TokenData
from megavlm.prep.readers.webdataset import CaptionRule, read_tar_shard
from tools import encode_images as tool


def img_bytes(i: int, fmt: str, size: int = 36) -> bytes:
    yy, xx = np.mgrid[:size, :size]
    arr = np.stack([(xx * (i + 3) * 5) % 256, (yy * 7 + i * 40) % 256, np.full_like(xx, 30 * i % 256)], -1)
    b = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(b, format=fmt)
    return b.getvalue()


FMTS = [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")]


def write_shard(path, first: int, n: int, extra=()):
    """img2dataset layout: KEY.{jpg,png,webp} + KEY.txt + KEY.json (DataComp-DR-like syn captions)."""
    with wds.TarWriter(str(path)) as w:
        for i in range(first, first + n):
            ext, fmt = FMTS[i % 3]
            w.write({"__key__": f"{i:09d}", ext: img_bytes(i, fmt), "txt": f"alt text {i}",
                     "json": json.dumps({"syn_text": [f"a synthetic caption {i} {j}" for j in range(3)]})})
        for s in extra:
            w.write(s)


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    cfg = SiglipVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                             image_size=32, patch_size=8)
    d = tmp_path_factory.mktemp("siglip")
    SiglipVisionModel(cfg).save_pretrained(d)
    return d


@pytest.fixture
def shards(tmp_path):
    d = tmp_path / "wds"
    d.mkdir()
    for s in range(3):
        write_shard(d / f"shard-{s:05d}.tar", 10 * s, 4)
    return str(d / "shard-{00000..00002}.tar")


def _args(inputs, sp_model, siglip_dir, out, *extra):
    return ["--input", *([inputs] if isinstance(inputs, str) else inputs), "--output", str(out),
            "--encoder", f"siglip:{siglip_dir}", "--tokenizer", str(sp_model), "--decoder", "pil",
            "--batch-size", "3", "--no-progress", *extra]


def test_caption_rules_are_deterministic(tmp_path):
    write_shard(tmp_path / "s.tar", 0, 6)
    txt = read_tar_shard(tmp_path / "s.tar")
    assert [s.caption for s in txt] == [f"alt text {i}" for i in range(6)]
    first = read_tar_shard(tmp_path / "s.tar", CaptionRule.parse("json:syn_text"))
    assert [s.caption for s in first] == [f"a synthetic caption {i} 0" for i in range(6)]
    h1 = [s.caption for s in read_tar_shard(tmp_path / "s.tar", CaptionRule.parse("json:syn_text", "hash", 7))]
    h2 = [s.caption for s in read_tar_shard(tmp_path / "s.tar", CaptionRule.parse("json:syn_text", "hash", 7))]
    assert h1 == h2 and len({c[-1] for c in h1}) > 1  # same every time, not always the same index
    # the fallback chain: a missing JSON field falls back to the text member
    assert read_tar_shard(tmp_path / "s.tar", CaptionRule.parse("json:nope,txt"))[0].caption == "alt text 0"


def test_tar_shards_encode_and_two_workers_equal_one(tmp_path, shards, sp_model, siglip_dir, tok, monkeypatch):
    rule = ["--caption", "json:syn_text", "--caption-choice", "hash", "--caption-seed", "3"]
    assert tool.main(_args(shards, sp_model, siglip_dir, tmp_path / "one", *rule)) == 0
    store = EmbeddingStore(tmp_path / "one.embeds", embed_dim=24, num_patches=16)
    assert len(store) == 12 and store.meta.keys[:2] == ["000000000", "000000001"]
    assert store.meta.source == {"format": "webdataset", "caption_sources": ["json:syn_text"],
                                 "caption_choice": "hash", "caption_seed": 3}
    want = read_tar_shard(tmp_path / "wds/shard-00001.tar", CaptionRule.parse("json:syn_text", "hash", 3))
    assert TokenData(tmp_path / "one")[4].tolist() == tok.encode(want[0].caption)
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert tool.main(_args(shards, sp_model, siglip_dir, tmp_path / "two", *rule)) == 0
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert not (tmp_path / "two.embeds.json").exists()
    assert tool.main(["--merge", "--output", str(tmp_path / "two")]) == 0
    for ext in (".embeds.bin", ".embeds.idx", ".embeds.json", ".bin", ".idx"):
        assert (tmp_path / f"one{ext}").read_bytes() == (tmp_path / f"two{ext}").read_bytes(), ext


def _tar(path, members):
    with tarfile.open(path, "w") as t:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))


BAD = {
    "undecodable": ([("000000007.jpg", b"\xff\xd8 not really a jpeg"), ("000000007.txt", b"broken")],
                    r"bad\.tar: member 000000007: cannot decode image"),
    "no_caption": ([("000000008.png", img_bytes(8, "PNG"))], r"bad\.tar: member 000000008: no caption \(txt\)"),
    "duplicate": ([("000000001.png", img_bytes(1, "PNG")), ("000000001.txt", b"again")],
                  r"bad\.tar: member 000000001: key appears twice"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_member_is_named_then_skipped_and_listed(tmp_path, sp_model, siglip_dir, kind):
    members, msg = BAD[kind]
    good = [(f"{i:09d}.{e}", d) for i in range(3) for e, d in (("png", img_bytes(i, "PNG")), ("txt", f"cap {i}".encode()))]
    _tar(tmp_path / "bad.tar", good + members)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=msg):
        read_tar_shard(tmp_path / "bad.tar", CaptionRule()) if kind != "undecodable" else None
        from megavlm.prep.imageparts import encode_tar_part
        encode_tar_part(tmp_path / "bad.tar", tmp_path / "p", None, encoder=None, decode=None,
                        tokenizer=_Tok(), rule=CaptionRule())
    assert tool.main(_args(str(tmp_path / "bad.tar"), sp_model, siglip_dir, out)) == 1
    assert not (tmp_path / "out.embeds.json").exists() and not list((tmp_path / "out.parts").glob("*.done.json"))
    assert not list((tmp_path / "out.parts").glob("p*.idx"))
    assert tool.main(_args(str(tmp_path / "bad.tar"), sp_model, siglip_dir, out, "--bad-images", "skip")) == 0
    assert len(EmbeddingStore(f"{out}.embeds")) == 3
    rej = [json.loads(x) for x in (tmp_path / "out.rejects.jsonl").read_text().splitlines()]
    assert len(rej) == 1 and rej[0]["shard"].endswith("bad.tar")
    import re
    assert re.search(msg, rej[0]["problem"])


class _Tok:
    vocab_size = 100

    def encode(self, s):
        return [1, 2]


def test_truncated_tar_is_named_and_nothing_kept(tmp_path, shards, sp_model, siglip_dir):
    src = (tmp_path / "wds/shard-00001.tar").read_bytes()
    (tmp_path / "wds/shard-00001.tar").write_bytes(src[:len(src) // 2 + 100])
    with pytest.raises(DataError, match=r"shard-00001\.tar: corrupt or truncated tar after member 0000000\d\d\.\w+"):
        read_tar_shard(tmp_path / "wds/shard-00001.tar")
    out = tmp_path / "out"
    assert tool.main(_args(shards, sp_model, siglip_dir, out)) == 1
    done = sorted(p.name for p in (tmp_path / "out.parts").glob("*.done.json"))
    assert done == ["p000000.done.json"]  # the shard before is kept; the broken one is not complete
    assert not (tmp_path / "out.embeds.json").exists()
    # the same job with the skip policy: the finished part is kept, the rest made, the break listed
    assert tool.main(_args(shards, sp_model, siglip_dir, out, "--bad-images", "skip")) == 0
    n = len(EmbeddingStore(tmp_path / "out.embeds"))
    assert 8 <= n < 12
    rej = (tmp_path / "out.rejects.jsonl").read_text()
    assert "shard-00001.tar: corrupt or truncated tar" in rej
