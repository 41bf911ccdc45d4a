"""Readers of the question-answering benchmarks in the files their authors publish.

* VQAv2: ``v2_OpenEnded_mscoco_val2014_questions.json`` (``{"data_subtype": "val2014",
  "questions": [{image_id, question, question_id}]}``) + ``v2_mscoco_val2014_annotations.json``
  (``{"annotations": [{question_id, image_id, answers: [{answer, answer_confidence, answer_id}],
  multiple_choice_answer, question_type, answer_type}]}``); images ``COCO_val2014_%012d.jpg``.
* GQA: ``testdev_balanced_questions.json`` (``{qid: {imageId, question, answer, fullAnswer, …}}``);
  images ``{imageId}.jpg``.
* TextVQA: ``TextVQA_0.5.1_val.json`` (``{"data": [{question_id, question, image_id, answers,
  ocr_tokens, …}]}``); images ``train_images/{image_id}.jpg`` (the val split ships with the
  train images).
* POPE: ``coco_pope_{adversarial,popular,random}.json``, JSON lines ``{question_id, image, text,
  label: yes|no}``; the split comes from the file name.
* generic: a JSON list / JSONL of ``{question_id, image, question, answers}``.

Every question's ``image`` is its file path relative to the task's image folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from megavlm.eval import scorers
from megavlm.eval.questions import VisionQuestion, load_json, load_json_or_lines, need
from megavlm.eval.runner import EvalError


def coco_file_name(image_id: int | str, subtype: str = "val2014") -> str:
    return f"COCO_{subtype}_{int(image_id):012d}.jpg"


def read_vqav2(questions: str | Path, annotations: Optional[str | Path] = None) -> list[VisionQuestion]:
    """VQAv2 questions (+ annotations: the ten human answers). Without annotations the answers
    are empty (predict only)."""
    qs = load_json(questions)
    if not isinstance(qs, dict) or not isinstance(qs.get("questions"), list):
        raise EvalError(f"{questions}: not a VQAv2 question file (no 'questions' list)")
    subtype = str(qs.get("data_subtype") or "val2014")
    answers: dict = {}
    if annotations is not None:
        ann = load_json(annotations)
        if not isinstance(ann, dict) or not isinstance(ann.get("annotations"), list):
            raise EvalError(f"{annotations}: not a VQAv2 annotation file (no 'annotations' list)")
        for i, a in enumerate(ann["annotations"]):
            where = f"{annotations}: annotation {i}"
            got = need(a, ("answers",), where)
            answers[need(a, ("question_id",), where)] = tuple(str(need(x, ("answer",), where)) for x in got)
    out = []
    for i, q in enumerate(qs["questions"]):
        where = f"{questions}: question {i}"
        qid = need(q, ("question_id",), where)
        if annotations is not None and qid not in answers:
            raise EvalError(f"{annotations}: no answers for question {qid}")
        out.append(VisionQuestion(str(qid), coco_file_name(need(q, ("image_id",), where), subtype),
                                  str(need(q, ("question",), where)), answers.get(qid, ())))
    return out


def read_gqa(path: str | Path) -> list[VisionQuestion]:
    """GQA balanced questions: ``{qid: {imageId, question, answer, …}}``."""
    d = load_json(path)
    if not isinstance(d, dict) or not d or not all(isinstance(v, dict) and "imageId" in v for v in d.values()):
        raise EvalError(f"{path}: not a GQA question file (expected an object keyed by question id "
                        f"whose records have an 'imageId')")
    out = []
    for k, v in d.items():
        where = f"{path}: question {k}"
        out.append(VisionQuestion(str(k), f"{v['imageId']}.jpg", str(need(v, ("question",), where)),
                                  (str(v["answer"]),) if "answer" in v else ()))
    return out


def read_textvqa(path: str | Path) -> list[VisionQuestion]:
    """TextVQA: ``{"data": [{question_id, image_id, question, answers, ocr_tokens}]}``."""
    d = load_json(path)
    if not isinstance(d, dict) or not isinstance(d.get("data"), list):
        raise EvalError(f"{path}: not a TextVQA file (no 'data' list)")
    out = []
    for i, r in enumerate(d["data"]):
        where = f"{path}: record {i}"
        image = str(need(r, ("image_id",), where))
        out.append(VisionQuestion(str(need(r, ("question_id",), where)), f"train_images/{image}.jpg",
                                  str(need(r, ("question",), where)),
                                  tuple(str(a) for a in r.get("answers", ())),
                                  ocr=tuple(str(t) for t in r.get("ocr_tokens", ()))))
    return out


def read_pope(path: str | Path, split: str = "") -> list[VisionQuestion]:
    """POPE JSON lines ``{question_id, image, text, label: yes|no}``; the split defaults to the file
    name's ``adversarial`` / ``popular`` / ``random``."""
    recs = load_json_or_lines(path)
    if isinstance(recs, dict):
        recs = [recs]
    if not isinstance(recs, list):
        raise EvalError(f"{path}: not a POPE file (expected JSON lines of {{question_id, image, text, label}})")
    split = split or next((s for s in scorers.POPE_SPLITS if s in Path(path).name), "")
    out = []
    for i, r in enumerate(recs):
        where = f"{path}: record {i}"
        label = str(need(r, ("label", "answer"), where)).strip().lower()
        if label not in ("yes", "no"):
            raise EvalError(f"{where}: label {label!r} is not yes/no")
        out.append(VisionQuestion(str(r.get("question_id", i)), str(need(r, ("image",), where)),
                                  str(need(r, ("text", "question"), where)), (label,),
                                  label=label == "yes", split=r.get("split", split)))
    return out


def read_generic(path: str | Path) -> list[VisionQuestion]:
    """JSON list / JSONL of ``{question_id, image, question, answers}``."""
    recs = load_json(path)
    if not isinstance(recs, list):
        raise EvalError(f"{path}: not a generic question file (expected a JSON list or JSON lines)")
    out = []
    for i, r in enumerate(recs):
        where = f"{path}: record {i}"
        ans = r.get("answers", r.get("answer", ())) if isinstance(r, dict) else ()
        ans = (ans,) if isinstance(ans, str) else tuple(a["answer"] if isinstance(a, dict) else a for a in ans)
        out.append(VisionQuestion(str(r.get("question_id", i)), str(need(r, ("image", "image_id"), where)),
                                  str(need(r, ("question", "text"), where)), ans))
    return out
