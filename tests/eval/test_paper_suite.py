"""``megavlm eval vision --suite paper`` end to end: files in the published layouts with real
images, encoded once with the checkpoint's recorded encoder (the real EfficientNet-Lite0) into the
cache, scored by the existing scorers; and each bad input's error."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from megavlm.data.indexed import EmbeddingStore
from megavlm.eval import cli, paper, scorers
from tests.eval.layouts import build_data_root

PRESENT = ["vqav2", "gqa", "textvqa", "textvqa_ocr", "pope", "refcoco", "refcocog", "ocid_ref"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return build_data_root(tmp_path_factory.mktemp("bench"))


def run_cli(capsys, *args):
    rc = cli.main(["vision", *map(str, args)])
    out = capsys.readouterr()
    return rc, out


def test_suite_paper_end_to_end(encoder_checkpoint, data_root, tmp_path, capsys):
    out_file = tmp_path / "paper.json"
    rc, out = run_cli(capsys, "--checkpoint", encoder_checkpoint, "--suite", "paper", "--data-root", data_root,
                      "--max-new-tokens", "6", "--batch-size", "3", "--output-path", out_file)
    assert rc == 0, out.err
    assert "skipped" in out.err and "refcoco+" in out.err  # the absent task is listed
    summary = json.loads(out.out)
    assert summary.pop("prompt")["source"].startswith("checkpoint")  # which template scored them
    assert summary.pop("checkpoint") == str(encoder_checkpoint.resolve())  # which checkpoint
    assert list(summary) == PRESENT
    res = json.loads(out_file.read_text())
    assert "template" in res.pop("prompt")
    assert res.pop("checkpoint") == str(encoder_checkpoint.resolve())
    assert res["vqav2"]["n"] == 3 and res["pope"]["n"] == 6 and set(res["pope"]["per_split"]) == set(scorers.POPE_SPLITS)
    assert res["ocid_ref"]["n"] == 2 and set(res["ocid_ref"]["per_split"]) == {"free", "stacked"}
    for task, r in res.items():  # every score is the scorer's on the stored prediction
        assert 0.0 <= r["accuracy"] <= 1.0 and len(r["predictions"]) == r["n"]
        if task in ("refcoco", "refcocog"):
            assert all(p["score"] == scorers.box_accuracy(p["prediction"], (0.1, 0.1, 0.6, 0.6), 0.5)
                       for p in r["predictions"])
        if task == "vqav2":
            assert r["accuracy"] == pytest.approx(np.mean(
                [scorers.vqa_accuracy(p["prediction"], [str(i)] * 10) for i, p in enumerate(r["predictions"])]))

    # images went through the checkpoint's encoder once, into the cache, keyed by file name
    cache = data_root / ".megavlm-cache" / "efficientnet-lite0-64px"
    store = EmbeddingStore(cache / "vqav2_val2014.embeds")
    assert store.meta.keys == [f"COCO_val2014_{42 + i:012d}.jpg" for i in range(3)]
    from PIL import Image

    from megavlm.encoders import decode_pil, make_encoder

    enc = make_encoder("efficientnet-lite0", 64)
    capsys.readouterr()  # the library's loading message
    want = enc(np.stack([decode_pil((data_root / "vqav2/val2014" / store.meta.keys[0]).read_bytes(), 64)]))[0]
    assert torch.allclose(store.get_tensor(0).float(), want, rtol=2e-2, atol=2e-2)
    assert Image.open(data_root / "vqav2/val2014" / store.meta.keys[0]).format == "JPEG"
    refs = EmbeddingStore(cache / "refcoco_train2014.embeds")  # shared by refcoco and refcocog
    assert refs.meta.keys == ["COCO_train2014_000000581857.jpg"]

    # a second run reads the cache (no re-encoding) and answers the same
    stamp = {p: p.stat().st_mtime_ns for p in cache.iterdir()}
    rc, out2 = run_cli(capsys, "--checkpoint", encoder_checkpoint, "--suite", "paper", "--data-root", data_root,
                       "--max-new-tokens", "6", "--paper-tasks", "vqav2,textvqa_ocr")
    assert rc == 0, out2.err
    assert {p: p.stat().st_mtime_ns for p in cache.iterdir()} == stamp
    again = json.loads(out2.out)
    assert [t for t in again if t not in ("prompt", "checkpoint")] == ["vqav2", "textvqa_ocr"] and again["vqav2"]["accuracy"] == summary["vqav2"]["accuracy"]


def test_textvqa_ocr_prompt(data_root):
    (found,), _ = paper.discover(data_root, ["textvqa_ocr"])
    assert found.questions[0].question == "what brand is this?\nReference OCR token: ACME, cola"
    assert found.questions[1].question == "what number?"  # no OCR tokens: the plain question


# -- bad input --------------------------------------------------------------------------------


def test_strict_lists_missing_tasks(encoder_checkpoint, data_root, capsys):
    rc, out = run_cli(capsys, "--checkpoint", encoder_checkpoint, "--suite", "paper", "--data-root", data_root,
                      "--strict")
    assert rc == 2 and "--strict: paper-suite task(s) missing" in out.err and "refcoco+" in out.err


def test_checkpoint_without_encoder_record(tiny_checkpoint, data_root, capsys):
    rc, out = run_cli(capsys, "--checkpoint", tiny_checkpoint, "--suite", "paper", "--data-root", data_root)
    assert rc == 2 and "records no image encoder" in out.err and "model.vision.encoder" in out.err


def test_missing_images_are_counted(encoder_checkpoint, data_root, tmp_path, capsys):
    root = tmp_path / "root"
    shutil.copytree(data_root / "vqav2", root / "vqav2")
    for f in sorted((root / "vqav2" / "val2014").glob("*.jpg"))[1:]:
        f.unlink()
    rc, out = run_cli(capsys, "--checkpoint", encoder_checkpoint, "--suite", "paper", "--data-root", root)
    assert rc == 2, out.err
    assert "2 of 3 images are missing from" in out.err and "COCO_val2014_000000000043.jpg" in out.err


def test_no_task_under_root(encoder_checkpoint, tmp_path, capsys):
    rc, out = run_cli(capsys, "--checkpoint", encoder_checkpoint, "--suite", "paper", "--data-root", tmp_path)
    assert rc == 2 and "no paper-suite task found under" in out.err
