"""The benchmark readers on small files written in each benchmark's published layout, the
refuse-all unpickler, and each bad input's error."""
from __future__ import annotations

import json
import os
import pickle

import pytest

from megavlm.eval import formats
from megavlm.eval.runner import EvalError


def write_vqav2(d, n=3):
    d.mkdir(parents=True, exist_ok=True)
    qs = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014",
          "questions": [{"image_id": 42 + i, "question": f"How many cats {i}?", "question_id": 4200 + i}
                        for i in range(n)]}
    anns = {"annotations": [{"question_id": 4200 + i, "image_id": 42 + i, "question_type": "how many",
                             "answer_type": "number", "multiple_choice_answer": str(i),
                             "answers": [{"answer": str(i), "answer_confidence": "yes", "answer_id": k + 1}
                                         for k in range(10)]} for i in range(n)]}
    q, a = d / "v2_OpenEnded_mscoco_val2014_questions.json", d / "v2_mscoco_val2014_annotations.json"
    q.write_text(json.dumps(qs))
    a.write_text(json.dumps(anns))
    return q, a


def write_gqa(d):
    d.mkdir(parents=True, exist_ok=True)
    p = d / "testdev_balanced_questions.json"
    p.write_text(json.dumps({
        "20968379": {"semantic": [], "entailed": [], "equivalent": ["20968379"], "question": "Is the sky blue?",
                     "imageId": "n161313", "isBalanced": True, "groups": {"global": None, "local": "s"},
                     "answer": "yes", "semanticStr": "", "annotations": {}, "types": {}, "fullAnswer": "Yes, it is."},
        "20968380": {"question": "What color is the car?", "imageId": "n161314", "answer": "red",
                     "fullAnswer": "The car is red."}}))
    return p


def write_textvqa(d):
    d.mkdir(parents=True, exist_ok=True)
    p = d / "TextVQA_0.5.1_val.json"
    p.write_text(json.dumps({"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": [
        {"question": "what brand is this?", "image_id": "0054c91397f2fe05", "image_classes": ["Bottle"],
         "flickr_original_url": "", "flickr_300k_url": "", "image_width": 1024, "image_height": 664,
         "answers": ["acme"] * 10, "question_tokens": ["what", "brand"], "question_id": 34602,
         "set_name": "val", "ocr_tokens": ["ACME", "cola"]},
        {"question": "what number?", "image_id": "005635e119b9f32f", "answers": ["7"] * 10,
         "question_id": 34603, "ocr_tokens": []}]}))
    return p


def write_pope(d, n=2):
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for s in ("adversarial", "popular", "random"):
        p = d / f"coco_pope_{s}.json"
        p.write_text("".join(json.dumps({"question_id": i + 1, "image": f"COCO_val2014_{310196 + i:012d}.jpg",
                                         "text": "Is there a snowboard in the image?",
                                         "label": "yes" if i % 2 == 0 else "no"}) + "\n" for i in range(n)))
        out.append(p)
    return out


def write_refcoco(d, dataset="refcoco", by="unc"):
    """REFER's refs pickle (protocol 2, plain containers) + COCO instances."""
    sub = d / dataset
    sub.mkdir(parents=True, exist_ok=True)
    refs = [{"sent_ids": [0, 1], "file_name": "COCO_train2014_000000581857_16.jpg", "ann_id": 1719310,
             "ref_id": 0, "image_id": 581857, "split": "val", "category_id": 1,
             "sentences": [{"tokens": ["the", "lady"], "raw": "THE LADY", "sent_id": 0, "sent": "the lady"},
                           {"tokens": ["woman", "left"], "raw": "woman left", "sent_id": 1, "sent": "woman left"}]},
            {"sent_ids": [2], "file_name": "x.jpg", "ann_id": 1719311, "ref_id": 1, "image_id": 581857,
             "split": "testA", "category_id": 1,
             "sentences": [{"tokens": ["man"], "raw": "man", "sent_id": 2, "sent": "man"}]}]
    (sub / f"refs({by}).p").write_bytes(pickle.dumps(refs, protocol=2))
    inst = {"info": {}, "licenses": [], "categories": [{"id": 1, "name": "person"}],
            "images": [{"license": 1, "file_name": "COCO_train2014_000000581857.jpg", "height": 400,
                        "width": 640, "id": 581857}],
            "annotations": [{"segmentation": [[0, 0]], "area": 1.0, "iscrowd": 0, "image_id": 581857,
                             "bbox": [64.0, 40.0, 320.0, 200.0], "category_id": 1, "id": 1719310},
                            {"image_id": 581857, "bbox": [0, 0, 64, 40], "category_id": 1, "id": 1719311}]}
    (sub / "instances.json").write_text(json.dumps(inst))
    return sub / f"refs({by}).p", sub / "instances.json"


def write_ocid(d):
    d.mkdir(parents=True, exist_ok=True)
    p = d / "val_expressions.json"
    p.write_text(json.dumps({
        "12": {"take_id": 3, "scene_path": "ARID20/table/top/seq01/rgb/result_1.png", "sub_type": "x",
               "sequence_path": "ARID20/table/top/seq01", "bbox": "[64, 48, 320, 240]", "sentence": "the red bowl",
               "scene_instance_id": 1, "class": "bowl"},
        "13": {"take_id": 18, "scene_path": "ARID20/table/top/seq01/rgb/result_2.png",
               "bbox": "[0, 0, 640, 480]", "sentence": "the whole table"}}))
    return p


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
