"""Demo corpus parsers on tiny synthetic copies of the real formats; one slow test builds the real
corpus from the Debian packages (needs apt-get or the cached .deb files)."""
from __future__ import annotations

import gzip
import shutil
import struct
import time
import zlib

import numpy as np
import pytest

from megavlm.config import DataConfig, MixtureConfig, VisionConfig
from megavlm.demo import corpus, debian
from megavlm.data.indexed import DataError


def test_bible_parser(tmp_path):
    base = tmp_path / "usr/share/sword/modules/texts/ztext/engWEB2015eb"
    base.mkdir(parents=True)
    book = ('<title type="main">Genesis</title><chapter osisID="Gen.1" sID="Gen.1"/>' +
            '<w lemma="x">In</w> <w>the</w> beginning, God created<note placement="foot">a note</note> '
            'the heavens. ' * 20 + '<chapter osisID="Gen.2" sID="Gen.2"/>' + "“ Second chapter text here. ” " * 20)
    for part in ("ot", "nt"):
        blocks = [b"<milestone/>", book.encode()]
        bzz, bzs = b"", b""
        for blk in blocks:
            c = zlib.compress(blk)
            bzs += struct.pack("<III", len(bzz), len(c), len(blk))
            bzz += c
        (base / f"{part}.bzs").write_bytes(bzs)
        (base / f"{part}.bzz").write_bytes(bzz)
    ch = list(debian.bible_chapters(tmp_path))
    assert [c for c, _ in ch] == ["Gen.1", "Gen.2"] * 2
    text = ch[0][1]
    assert text.startswith("In the beginning, God created the heavens.")
    assert "note" not in text and "Genesis" not in text and "<" not in text
    assert ch[1][1].startswith("“Second chapter")


def test_wordnet_parsers(tmp_path):
    wn = tmp_path / "usr/share/wordnet"
    wn.mkdir(parents=True)
    head = "  1 This software and database is being provided\n"
    line1 = "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived to exist\n"
    off2 = len(head) + len(line1)
    line2 = f"{off2:08d} 06 n 02 tee_shirt 0 T-shirt 0 000 | a close-fitting pullover shirt; \"he wore a tee\"\n"
    (wn / "data.noun").write_text(head + line1 + line2)
    for pos in ("verb", "adj", "adv"):
        (wn / f"data.{pos}").write_text(head)
    (wn / "index.noun").write_text(f"tee_shirt n 1 1 @ 1 0 {off2:08d}\n")
    g = list(debian.wordnet_glosses(tmp_path))
    assert g[1] == ("tee shirt", 'tee shirt (noun): a close-fitting pullover shirt; "he wore a tee"')
    assert debian.wordnet_definition(tmp_path, ["t-shirt", "tee_shirt"]) == "a close-fitting pullover shirt"
    with pytest.raises(DataError, match="none of"):
        debian.wordnet_definition(tmp_path, ["zebra"])


def test_idx_files(tmp_path):
    imgs = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    (tmp_path / "i.gz").write_bytes(gzip.compress(struct.pack(">IIII", 2051, 2, 3, 3) + imgs.tobytes()))
    (tmp_path / "l.gz").write_bytes(gzip.compress(struct.pack(">II", 2049, 2) + bytes([4, 9])))
    assert np.array_equal(debian.idx_images(tmp_path / "i.gz"), imgs)
    assert debian.idx_labels(tmp_path / "l.gz").tolist() == [4, 9]
    with pytest.raises(DataError, match="not an IDX image"):
        debian.idx_images(tmp_path / "l.gz")


def test_demo_refuses_a_vision_config_it_cannot_build(tmp_path):
    with pytest.raises(DataError, match="embed_dim=1280"):
        corpus.ensure_demo_corpus(DataConfig(root=str(tmp_path), build="demo"), VisionConfig(embed_dim=1152, num_patches=16))
    corpus.ensure_demo_corpus(DataConfig(root=str(tmp_path), build="none"), VisionConfig())  # no-op
    assert list(tmp_path.iterdir()) == []


def _have_assets() -> bool:
    cache = debian.default_cache()
    cached = all(list(cache.glob(f"{p}_*.deb")) or (cache / "extract" / p / ".complete").is_file()
                 for p in debian.PACKAGES)
    return cached or shutil.which("apt-get") is not None


@pytest.mark.slow
@pytest.mark.skipif(not _have_assets(), reason="needs apt-get or the cached demo .deb files")
def test_real_demo_corpus_builds_once_and_loads(tmp_path):
    from megavlm.data.mixture import LoaderSpec
    from megavlm.train.plan import build_loader

    data = DataConfig(root=str(tmp_path / "demo"), build="demo", instructions=["instructions"])
    vision = VisionConfig(embed_dim=1280, num_patches=16)
    corpus.ensure_demo_corpus(data, vision)
    t = time.perf_counter()
    corpus.ensure_demo_corpus(data, vision)
    assert time.perf_counter() - t < 1.0
    for name in ("text_heldout.idx", "captions_heldout.embeds.json", "instructions_heldout.meta.json"):
        assert (tmp_path / "demo" / name).is_file()
    ld = build_loader(LoaderSpec(stage="x", data=data, vision=vision, seq_length=256, seed=0,
                                 mixture=MixtureConfig(text=0.5, captions=0.3, instructions=0.2)),
                      micro_batch_size=2, num_microbatches=2)
    assert ld.tokenizer.vocab_size == 8192
    b = ld.next_step()[0]
    assert b.tokens.max() < 8192 and b.image_embeds is not None and b.image_embeds.shape[1:] == (16, 1280)
    assert ld.tokenizer.decode(b.tokens[0, :40].tolist())


def test_a_set_the_demo_builder_does_not_make_is_refused_before_anything_is_built(tmp_path, capsys):
    """``data.instructions=[instuctions]`` (a typo) used to build a fresh copy of the demo
    instructions under that name and train on it."""
    from megavlm.cli import main

    root = tmp_path / "demo"
    rc = main(["train", "--config", "launch/configs/tiny.yaml", "data.instructions=[instuctions]",
               f"data.root={root}", f"run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc != 0
    assert "'instuctions'" in err and "instructions, instructions_heldout, instructions_vqa" in err
    assert not root.exists() and not (tmp_path / "run").exists()
    # `train --check` names it too (among every other problem), and builds nothing either
    assert main(["train", "--config", "launch/configs/tiny.yaml", "--check", "data.instructions=[instuctions]",
                 f"data.root={root}", f"run_dir={tmp_path / 'run'}"]) == 2
    assert "'instuctions' is not one of them" in capsys.readouterr().err
    assert not root.exists()


def test_the_demo_recipes_name_only_sets_the_builder_makes():
    from pathlib import Path

    from megavlm.config import load_config

    recipes = [p for p in sorted(Path("launch/configs").glob("*.yaml"))
               if load_config(p).data.build == "demo"]
    assert recipes
    for p in recipes:
        corpus.check_set_names(load_config(p).data)
