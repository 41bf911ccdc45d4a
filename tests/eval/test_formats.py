"""The benchmark readers on small files written in each benchmark's published layout (tests/eval/
layouts.py), the refuse-all unpickler, and each bad input's error."""
from __future__ import annotations

import json
import os
import pickle

import pytest

from megavlm.eval import formats
from megavlm.eval.runner import EvalError
from tests.eval.layouts import write_gqa, write_ocid, write_pope, write_refcoco, write_textvqa, write_vqav2


def test_vqav2(tmp_path):
    q, a = write_vqav2(tmp_path)
    qs = formats.read_vqav2(q, a)
    assert [x.image for x in qs] == [f"COCO_val2014_{42 + i:012d}.jpg" for i in range(3)]
    assert qs[1].answers == ("1",) * 10 and qs[1].qid == "4201" and qs[1].question == "How many cats 1?"
    assert formats.detect_layout(q) == "vqav2"
    assert formats.read_vqav2(q)[0].answers == ()  # questions only: predict-only
    a2 = tmp_path / "a2.json"
    a2.write_text(json.dumps({"annotations": []}))
    with pytest.raises(EvalError, match=r"a2.json: no answers for question 4200"):
        formats.read_vqav2(q, a2)


def test_gqa_textvqa_pope(tmp_path):
    g = formats.read_questions(write_gqa(tmp_path / "gqa"))
    assert [(x.qid, x.image, x.answers) for x in g] == [("20968379", "n161313.jpg", ("yes",)),
                                                        ("20968380", "n161314.jpg", ("red",))]
    t = formats.read_questions(write_textvqa(tmp_path / "tv"))
    assert t[0].image == "train_images/0054c91397f2fe05.jpg" and t[0].ocr == ("ACME", "cola")
    assert t[0].answers == ("acme",) * 10 and t[1].ocr == ()
    pope = [q for f in write_pope(tmp_path / "pope") for q in formats.read_questions(f)]
    assert [q.split for q in pope] == ["adversarial"] * 2 + ["popular"] * 2 + ["random"] * 2
    assert [q.label for q in pope[:2]] == [True, False] and pope[0].image == "COCO_val2014_000000310196.jpg"


def test_refcoco_boxes_and_splits(tmp_path):
    refs, inst = write_refcoco(tmp_path)
    assert formats.detect_layout(refs) == "refcoco"
    qs = formats.read_questions(refs)  # instances.json beside the refs file; split val
    assert [(q.qid, q.question, q.split) for q in qs] == [("0-0", "the lady", "val"), ("0-1", "woman left", "val")]
    # [64, 40, 320, 200] px xywh in a 640x400 image -> xyxy [64, 40, 384, 240] / (640, 400)
    assert qs[0].box == (0.1, 0.1, 0.6, 0.6) and qs[0].image == "COCO_train2014_000000581857.jpg"
    both = formats.read_refcoco(refs, inst, splits=("val", "testA"))
    assert len(both) == 3 and both[2].box == (0.0, 0.0, 0.1, 0.1) and both[2].split == "testA"


def test_ocid_ref(tmp_path):
    p = write_ocid(tmp_path)
    assert formats.detect_layout(p) == "ocid_ref"
    qs = formats.read_questions(p)
    assert qs[0].box == (0.1, 0.1, 0.5, 0.5) and qs[0].split == "free" and qs[0].question == "the red bowl"
    assert qs[1].box == (0.0, 0.0, 1.0, 1.0) and qs[1].split == "stacked"
    assert qs[0].image == "ARID20/table/top/seq01/rgb/result_1.png"


# -- bad input ----------------------------------------------------------------------------------


class _Boom:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_pickle_with_a_class_is_refused_unexecuted(tmp_path):
    marker = tmp_path / "was-run"
    bad = tmp_path / "refcoco" / "refs(unc).p"
    bad.parent.mkdir()
    bad.write_bytes(pickle.dumps([{"ref_id": 0, "ann_id": 1, "sentences": [], "x": _Boom(marker)}], protocol=2))
    (bad.parent / "instances.json").write_text(json.dumps({"images": [], "annotations": []}))
    # the payload is real: an ordinary pickle.load would run it
    with pytest.raises(EvalError, match=r"refs\(unc\)\.p: refused to unpickle (posix|os)\.system"):
        formats.read_questions(bad)
    assert not marker.exists()
    pickle.loads(bad.read_bytes())
    assert marker.exists()


def test_pickle_of_a_set_or_object_is_refused(tmp_path):
    p = tmp_path / "refs(unc).p"
    p.write_bytes(pickle.dumps([{"ann_id": 1, "sentences": set()}], protocol=2))
    with pytest.raises(EvalError, match=r"refused to unpickle (__builtin__|builtins)\.set"):
        formats.load_plain_pickle(p)
    p.write_bytes(b"not a pickle")
    with pytest.raises(EvalError, match=r"refs\(unc\)\.p: not a readable refs pickle"):
        formats.load_plain_pickle(p)


def test_unknown_layout(tmp_path):
    p = tmp_path / "mystery.json"
    p.write_text(json.dumps({"items": [{"foo": 1}]}))
    with pytest.raises(EvalError, match=r"mystery.json: unknown question file layout; known layouts: vqav2: .*"
                                        r"gqa: .*textvqa: .*pope: .*refcoco: .*ocid_ref: "):
        formats.read_questions(p)
    with pytest.raises(EvalError, match=r"not a GQA question file"):
        formats.read_gqa(p)
    with pytest.raises(EvalError, match=r"not a TextVQA file"):
        formats.read_textvqa(p)
    with pytest.raises(EvalError, match=r"not an OCID-Ref file"):
        formats.read_ocid_ref(p)


def test_bad_records(tmp_path):
    p = tmp_path / "coco_pope_random.json"
    p.write_text(json.dumps({"question_id": 1, "image": "a.jpg", "text": "Is there a cat?", "label": "maybe"}) + "\n")
    with pytest.raises(EvalError, match=r"coco_pope_random.json: record 0: label 'maybe' is not yes/no"):
        formats.read_pope(p)
    o = tmp_path / "ocid.json"
    o.write_text(json.dumps({"1": {"scene_path": "a.png", "sentence": "x", "bbox": "[0, 0, 700, 10]"}}))
    with pytest.raises(EvalError, match=r"ocid.json: example 1: box .* is not inside the 640x480 image"):
        formats.read_ocid_ref(o)
    refs, inst = write_refcoco(tmp_path)
    d = json.loads(inst.read_text())
    d["annotations"] = d["annotations"][1:]
    inst.write_text(json.dumps(d))
    with pytest.raises(EvalError, match=r"ref 0: annotation 1719310 is not in .*instances.json"):
        formats.read_refcoco(refs, inst)


def test_missing_images_counted(tmp_path):
    qs = formats.read_vqav2(*write_vqav2(tmp_path / "vqav2", n=8))
    imgs = tmp_path / "vqav2" / "val2014"
    imgs.mkdir()
    (imgs / "COCO_val2014_000000000042.jpg").write_bytes(b"x")
    assert len(formats.missing_images(qs, imgs)) == 7
    with pytest.raises(EvalError, match=r"questions.json: 7 of 8 images are missing from .*val2014: "
                                        r"COCO_val2014_000000000043.jpg, .*, … \(2 more\)"):
        formats.check_images(qs, imgs, tmp_path / "vqav2" / "v2_OpenEnded_mscoco_val2014_questions.json")
