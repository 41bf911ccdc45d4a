"""Scoring rules of the vision benchmarks, as TRI's vlm-evaluation applies them (pure functions).

* VQAv2: the official VQA answer normalization (punctuation, periods that are not decimal points,
  number words to digits, articles dropped, common contractions restored) and the official
  accuracy: for each of the (usually 10) human answers left out in turn, min(#matching among the
  other answers / 3, 1), averaged.
* TextVQA: the same normalization; accuracy min(#matching among all human answers / 3, 1)
  (the m4c evaluator's rule, without the leave-one-out average).
* GQA: exact match after lower-casing and removing punctuation.
* POPE: yes/no accuracy per split (adversarial, popular, random), averaged over splits.
* RefCOCO / RefCOCO+ / RefCOCOg / OCID-Ref: the whole generated answer must be a list of four
  numbers [x1, y1, x2, y2] with x1 < x2 and y1 < y2 (vlm-evaluation's rule); correct when its IoU
  with the normalized reference box is at least 0.5 (RefCOCO family) / 0.25 (OCID-Ref). Any other
  answer scores 0.
"""

from __future__ import annotations

import re
import string
from typing import Iterable, Mapping, Optional, Sequence

# -- VQA normalization ------------------------------------------------------------------------

_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
# Answers written without the apostrophe, mapped to the apostrophe form annotators mostly used.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "im": "i'm", "ive": "i've", "isnt": "isn't", "itd": "it'd", "itll": "it'll",
    "lets": "let's", "mightnt": "mightn't", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "shant": "shan't", "shed": "she'd", "shes": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "thats": "that's", "thered": "there'd",
    "theres": "there's", "theyd": "they'd", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "wasnt": "wasn't", "wed": "we'd", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've",
    "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "whod": "who'd", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "yall": "y'all", "youd": "you'd", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
# The official evaluator's punctuation set: the apostrophe and the period are handled apart
# (contractions keep their apostrophe; a period is dropped unless it is a decimal point).
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
          ",", "?", "!")
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")


def _punctuation(text: str) -> str:
    """A mark touching a space (or any mark, when the answer holds a digit,digit number) is
    removed; a mark inside a word becomes a space ('black-and-white' -> 'black and white')."""
    out = text
    glued = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or glued:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def _digits_articles(text: str) -> str:
    words = []
    for w in text.lower().split():
        w = _NUMBER_WORDS.get(w, w)
        if w not in _ARTICLES:
            words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def normalize_vqa(answer: str) -> str:
    """The official VQA normalization of one answer."""
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    return _digits_articles(_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy: mean over leave-one-out subsets of min(#matches / 3, 1)."""
    if not answers:
        raise ValueError("VQA accuracy needs at least one human answer")
    pred = normalize_vqa(prediction)
    gts = [normalize_vqa(a) for a in answers]
    if len(gts) == 1:
        return float(pred == gts[0])
    total = 0.0
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1:]
        total += min(sum(g == pred for g in others) / 3.0, 1.0)
    return total / len(gts)


def textvqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """TextVQA (m4c) accuracy: min(#matching human answers / 3, 1)."""
    if not answers:
        raise ValueError("TextVQA accuracy needs at least one human answer")
    pred = normalize_vqa(prediction)
    return min(sum(normalize_vqa(a) == pred for a in answers) / 3.0, 1.0)


def synonym_accuracy(prediction: str, accepted: Iterable[str]) -> float:
    """1 when the VQA-normalized prediction equals any VQA-normalized accepted answer."""
    pred = normalize_vqa(prediction)
    return float(any(pred == normalize_vqa(a) for a in accepted))


# -- GQA --------------------------------------------------------------------------------------

_STRIP_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_gqa(answer: str) -> str:
    return " ".join(answer.lower().translate(_STRIP_PUNCT).split())


def gqa_accuracy(prediction: str, answer: str) -> float:
    """GQA: exact match after lower-casing and stripping punctuation."""
    return float(normalize_gqa(prediction) == normalize_gqa(answer))


# -- POPE ---------------------------------------------------------------------------------------

POPE_SPLITS = ("adversarial", "popular", "random")


def yes_no(text: str) -> Optional[bool]:
    """True/False for a generated answer that starts with yes/no (after punctuation); else None."""
    words = normalize_gqa(text).split()
    if not words:
        return None
    return {"yes": True, "no": False}.get(words[0])


def pope_prediction(logp_yes: float, logp_no: float) -> bool:
    """POPE by likelihood: 'yes' when P("Yes") > P("No")."""
    return logp_yes > logp_no


def pope_accuracy(predictions: Sequence[bool], labels: Sequence[bool]) -> float:
    if len(predictions) != len(labels) or not labels:
        raise ValueError("POPE needs one prediction per label and at least one label")
    return sum(p == l for p, l in zip(predictions, labels)) / len(labels)


def pope_score(per_split: Mapping[str, float]) -> float:
    """Mean accuracy over the POPE splits present (all three for the benchmark)."""
    if not per_split:
        raise ValueError("POPE needs at least one split")
    return sum(per_split.values()) / len(per_split)


# -- referring expressions ---------------------------------------------------------------------

_NUM = r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?"
_WHOLE_BOX = re.compile(rf"\[\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\]")
REFCOCO_IOU = 0.5
OCIDREF_IOU = 0.25


def parse_box(text: str) -> Optional[tuple[float, float, float, float]]:
    """The box of an answer, as TRI's vlm-evaluation reads it: the *whole* answer (surrounding
    whitespace aside) must be a list of four numbers ``[x1, y1, x2, y2]``, each in [0, 1], with
    x1 < x2 and y1 < y2; anything else (text around the list, a degenerate or flipped box,
    pixel coordinates) is None, scored as wrong (TRI-ML/vlm-evaluation, harnesses/refcoco.py
    and ocidref.py ``parse_bbox``)."""
    m = _WHOLE_BOX.fullmatch(text.strip())
    if m is None:
        return None
    x1, y1, x2, y2 = (float(v) for v in m.groups())
    if not (x1 < x2 and y1 < y2) or not all(0.0 <= v <= 1.0 for v in (x1, y1, x2, y2)):
        return None
    return (x1, y1, x2, y2)


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two [x1, y1, x2, y2] boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def box_accuracy(prediction: str, box: Sequence[float], threshold: float) -> float:
    """1 when the parsed box overlaps the reference with IoU >= threshold; unparseable = 0."""
    parsed = parse_box(prediction)
    return float(parsed is not None and iou(parsed, box) >= threshold)
