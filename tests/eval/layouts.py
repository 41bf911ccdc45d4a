"""Small benchmark files in each benchmark's published layout, and a data root of them with real
images (the demo's held-out images when cached, else generated PNGs), for the format and suite tests."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np


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


def source_images(n: int, seed: int = 0) -> list:
    """``n`` RGB PIL images: the demo's held-out Fashion-MNIST/Tux Paint images when the demo corpus
    is cached here, else generated ones."""
    from PIL import Image

    raw = Path.home() / ".cache/megavlm/demo/raw/images"
    files = sorted(raw.glob("*.png"))[:n] if raw.is_dir() else []
    out = [Image.open(f).convert("RGB") for f in files]
    rng = np.random.default_rng(seed)
    while len(out) < n:
        out.append(Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)))
    return out


def put_images(folder: Path, names, seed: int = 0) -> None:
    """Write one real image per name (JPEG for .jpg, PNG otherwise), nested folders included."""
    names = list(dict.fromkeys(names))
    for name, im in zip(names, source_images(len(names), seed)):
        p = folder / name
        p.parent.mkdir(parents=True, exist_ok=True)
        im.save(p, "JPEG" if p.suffix == ".jpg" else "PNG")


def build_data_root(root: Path, skip: tuple[str, ...] = ("refcoco+",)) -> Path:
    """A --data-root in the paper suite's layout: every task but ``skip``, each with its images."""
    from megavlm.eval import formats

    q, a = write_vqav2(root / "vqav2", n=3)
    put_images(root / "vqav2" / "val2014", [x.image for x in formats.read_vqav2(q, a)])
    g = write_gqa(root / "gqa")
    put_images(root / "gqa" / "images", [x.image for x in formats.read_gqa(g)], seed=1)
    t = write_textvqa(root / "textvqa")
    put_images(root / "textvqa", [x.image for x in formats.read_textvqa(t)], seed=2)
    pope = write_pope(root / "pope")
    put_images(root / "pope" / "val2014", [x.image for f in pope for x in formats.read_pope(f)], seed=3)
    for ds, by in (("refcoco", "unc"), ("refcoco+", "unc"), ("refcocog", "umd")):
        if ds not in skip:
            write_refcoco(root / "refcoco", ds, by)
    put_images(root / "refcoco" / "train2014", ["COCO_train2014_000000581857.jpg"], seed=4)
    if "ocid_ref" not in skip:
        o = write_ocid(root / "ocid-ref")
        put_images(root / "ocid-ref" / "OCID-dataset", [x.image for x in formats.read_ocid_ref(o)], seed=5)
    return root
