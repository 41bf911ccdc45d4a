"""The demo corpus cache knows what it holds (megavlm.demo.corpus manifest), on a synthetic stand-in
for the raw corpora (the Debian download is the one slow test in test_corpus.py): every set is
recorded with its build parameters and file hashes; a missing set is built alone; a changed file,
other parameters or an old-style marker are never trusted; and the tiny recipe's three stages all
find their data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from megavlm import preflight
from megavlm.config import DataConfig, VisionConfig, load_config
from megavlm.demo import corpus
from tests.data.conftest import synthetic_text

VOCAB = 320
VISION = VisionConfig(embed_dim=1280, num_patches=4)  # 64 px: fast on a CPU


def _write_raw(root: Path) -> None:
    from PIL import Image

    raw = root / "raw"
    (raw / "images").mkdir(parents=True)
    docs = synthetic_text(400, seed=5, max_words=80)
    for name, part in (("text", docs[:380]), ("text_heldout", docs[380:])):
        (raw / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
    colours = {"red": (220, 30, 30), "blue": (30, 30, 220)}
    for split, n in (("", 6), ("_heldout", 2)):
        caps, convs = [], []
        for k in range(n):
            label = list(colours)[k % 2]
            p = raw / "images" / f"{label}{split}-{k}.png"
            Image.fromarray(np.full((40, 40, 3), colours[label], np.uint8)).save(p)
            caps.append({"image": str(p), "caption": f"A {label} square."})
            convs.append({"id": f"c{split}{k}", "image": str(p), "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": label}]})
        (raw / f"captions{split}.jsonl").write_text("".join(json.dumps(c) + "\n" for c in caps))
        (raw / f"conversations{split}.json").write_text(json.dumps(convs))
    (raw / "raw.json").write_text(json.dumps({"full": False, "text_documents": 400}))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    pytest.importorskip("efficientnet_lite_pytorch")
    root = tmp_path_factory.mktemp("demo")
    _write_raw(root)
    data = DataConfig(root=str(root), build="demo", instructions=["instructions"])
    names = corpus.ensure_demo_corpus(data, VISION, vocab_size=VOCAB)
    return root, data, names


def test_every_set_is_recorded_with_its_parameters(built):
    root, data, names = built
    assert names == ["tokenizer.model", "text", "text_heldout", "captions", "captions_heldout",
                     "instructions", "instructions_heldout"]
    m = json.loads((root / "demo.json").read_text())
    assert m["manifest_version"] == 2 and m["version"] == corpus.DEMO_VERSION == 1  # + the legacy marker
    cap = m["sets"]["captions"]
    assert cap["params"]["encoder"] == "efficientnet-lite0" and cap["params"]["image_size"] == 64
    assert cap["params"]["resize"] == "square" and cap["params"]["num_patches"] == 4
    assert m["sets"]["tokenizer.model"]["params"]["vocab_size"] == VOCAB
    assert "sha256" in cap["files"]["captions.embeds.json"] and "sha256" not in cap["files"]["captions.embeds.bin"]
    assert m["sets"]["instructions"]["inputs"]["embeds"] == cap["files"]
    assert corpus.is_built(data, VISION, vocab_size=VOCAB)
    assert corpus.ensure_demo_corpus(data, VISION, vocab_size=VOCAB) == []  # cached: nothing rebuilt


def test_a_set_missing_from_the_manifest_is_built_alone(built):
    """The bug of issue 14: a cache marked complete without its instructions set."""
    root, data, _ = built
    m = json.loads((root / "demo.json").read_text())
    del m["sets"]["instructions"]
    (root / "demo.json").write_text(json.dumps(m))
    assert corpus.stale_sets(data, VISION, vocab_size=VOCAB) == {"instructions": "not in the manifest (never built)"}
    assert corpus.ensure_demo_corpus(data, VISION, vocab_size=VOCAB) == ["instructions"]
    assert corpus.is_built(data, VISION, vocab_size=VOCAB)


def test_stale_or_partial_cache_is_never_trusted(built, tmp_path):
    root, data, _ = built
    meta = root / "instructions_heldout.meta.json"
    good = meta.read_bytes()
    meta.write_bytes(good.replace(b"{", b"{ ", 1))
    assert corpus.stale_sets(data, VISION, vocab_size=VOCAB) == {
        "instructions_heldout": f"{meta}: changed since it was built"}
    meta.write_bytes(good)
    assert corpus.stale_sets(data, VISION, vocab_size=2 * VOCAB).keys() >= {"tokenizer.model", "text", "captions"}
    other = corpus.stale_sets(data, VisionConfig(embed_dim=1280, num_patches=16), vocab_size=VOCAB)
    assert set(other) == {"captions", "captions_heldout", "instructions", "instructions_heldout"}
    assert "image_size" in other["captions"] and "num_patches" in other["captions"]
    old = tmp_path / "old"
    old.mkdir()
    (old / "demo.json").write_text(json.dumps({"version": 1, "num_patches": 4, "embed_dim": 1280, "full": False}))
    assert len(corpus.stale_sets(DataConfig(root=str(old), build="demo"), VISION, vocab_size=VOCAB)) == 7


def test_tiny_recipe_finds_the_data_of_all_three_stages(built, tmp_path):
    root, _, _ = built
    run = load_config("launch/configs/tiny.yaml", [f"data.root={root}", f"model.vocab_size={VOCAB}",
                                                    "model.vision.num_patches=4", f"run_dir={tmp_path / 'run'}"])
    assert [s.name for s in run.stages] == ["text", "image", "sft"]
    assert preflight.check_run(run) == []
    from megavlm.prepare import unprepared

    assert unprepared(run) == []


@pytest.mark.slow
def test_tiny_recipe_trains_all_three_stages_on_the_demo_cache(built, tmp_path):
    from megavlm.cli import main as cli_main

    root, _, _ = built
    rc = cli_main(["train", "--config", "launch/configs/tiny.yaml", f"data.root={root}", f"model.vocab_size={VOCAB}",
                   "model.vision.num_patches=4", f"run_dir={tmp_path / 'run'}", "stages.0.tokens=20480",
                   "stages.1.tokens=4096", "stages.2.tokens=4096", "model.seq_length=64"])
    assert rc == 0
    for st in ("text", "image", "sft"):
        assert list((tmp_path / "run" / st / "checkpoints").glob("step_*/meta.json")), st


def test_short_vqa_set_records_its_files_and_store(built):
    from megavlm.demo import short_vqa

    root, _, _ = built
    data = DataConfig(root=str(root), build="demo", instructions=["instructions", short_vqa.NAME])
    assert short_vqa.ensure_short_vqa(data) is not None and short_vqa.is_built(data)
    meta = root / f"{short_vqa.NAME}.meta.json"
    good = meta.read_bytes()
    meta.write_bytes(good + b" ")
    assert not short_vqa.is_built(data)  # a changed file is not trusted
    meta.write_bytes(good)
    assert short_vqa.is_built(data)
