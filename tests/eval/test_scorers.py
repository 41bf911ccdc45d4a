"""Scoring rules on hand-worked examples (each expected value is worked out in the comment)."""
from __future__ import annotations

import pytest

from megavlm.eval import scorers
from megavlm.eval.stable_score import CHANCE, chance, stable_score


@pytest.mark.parametrize("raw, norm", [
    ("Two", "2"),                       # number word -> digit
    ("The dog.", "dog"),                # article dropped, final period dropped
    ("a red ball", "red ball"),
    ("black-and-white", "black and white"),  # mark inside a word -> space
    ("yes!", "yes"),                    # mark at the end (no space around): replaced by space, trimmed
    ("3.5", "3.5"),                     # decimal point kept
    ("1,000", "1000"),                  # digit,digit: every mark removed
    ("dont", "don't"),                  # contraction restored
    ("  Hello ,  world ", "hello world"),  # ' ,' touches a space -> removed
    ("none", "0"),
])
def test_vqa_normalization(raw, norm):
    assert scorers.normalize_vqa(raw) == norm


def test_vqa_accuracy_leave_one_out():
    # 10 human answers, 3 say "2" (one as "two"). Leaving out one of the 3: 2 matches -> 2/3;
    # leaving out one of the other 7: 3 matches -> 1. Mean = (3 * 2/3 + 7 * 1) / 10 = 0.9
    answers = ["2", "two", "2"] + ["3"] * 7
    assert scorers.vqa_accuracy("Two", answers) == pytest.approx(0.9)
    # 1 matching answer: left out -> 0, otherwise 1/3; mean = 9 * (1/3) / 10 = 0.3
    assert scorers.vqa_accuracy("cat", ["cat"] + ["dog"] * 9) == pytest.approx(0.3)
    # 4+ matches: always >= 3 among the others -> 1
    assert scorers.vqa_accuracy("a cat", ["cat"] * 4 + ["dog"] * 6) == pytest.approx(1.0)
    assert scorers.vqa_accuracy("bird", ["cat"] * 10) == 0.0


def test_textvqa_accuracy_no_leave_one_out():
    # m4c: min(#matches / 3, 1) over all answers: 1 match -> 1/3, 2 -> 2/3, 3 -> 1
    assert scorers.textvqa_accuracy("STOP", ["stop"] + ["go"] * 9) == pytest.approx(1 / 3)
    assert scorers.textvqa_accuracy("stop.", ["stop", "Stop"] + ["go"] * 8) == pytest.approx(2 / 3)
    assert scorers.textvqa_accuracy("stop", ["stop"] * 3 + ["go"] * 7) == 1.0


def test_gqa_exact_match():
    assert scorers.gqa_accuracy("Yes.", "yes") == 1.0
    assert scorers.gqa_accuracy("the table", "table") == 0.0   # GQA keeps articles
    assert scorers.gqa_accuracy("Left", "right") == 0.0


def test_pope():
    assert scorers.pope_prediction(-0.1, -2.0) is True
    assert scorers.pope_prediction(-3.0, -2.0) is False
    # 3/4 right on one split, 1/2 on another -> mean 0.625
    a = scorers.pope_accuracy([True, False, True, True], [True, False, False, True])
    b = scorers.pope_accuracy([True, True], [True, False])
    assert (a, b) == (0.75, 0.5)
    assert scorers.pope_score({"random": a, "popular": b}) == 0.625
    assert scorers.yes_no("Yes, there is.") is True and scorers.yes_no("no") is False
    assert scorers.yes_no("maybe") is None


def test_boxes():
    assert scorers.parse_box(" [0.1, 0.2, 0.5, 0.6]\n") == (0.1, 0.2, 0.5, 0.6)
    assert scorers.parse_box("[.1,0.2,5e-1,1]") == (0.1, 0.2, 0.5, 1.0)
    assert scorers.parse_box("It is at [0.1, 0.2, 0.5, 0.6].") is None  # the whole answer must be the list
    assert scorers.parse_box("[0.1, 0.2, 0.5, 0.6] and more") is None
    assert scorers.parse_box("[0.1, 0.2, 0.5]") is None       # three numbers
    assert scorers.parse_box("[0.5, 0.2, 0.1, 0.6]") is None  # x1 > x2
    assert scorers.parse_box("[0.1, 0.2, 0.1, 0.6]") is None  # x1 == x2: degenerate
    assert scorers.parse_box("[0.1, 0.6, 0.5, 0.2]") is None  # y1 > y2
    assert scorers.parse_box("[10, 20, 50, 60]") is None      # not normalized
    assert scorers.parse_box("the left cup") is None
    # [0,0,0.5,0.5] vs [0.25,0,0.75,0.5]: intersection 0.25*0.5 = 0.125, union 0.25+0.25-0.125
    # = 0.375 -> IoU 1/3: wrong at 0.5 (RefCOCO), right at 0.25 (OCID-Ref)
    assert scorers.iou([0, 0, .5, .5], [.25, 0, .75, .5]) == pytest.approx(1 / 3)
    pred = "[0.0, 0.0, 0.5, 0.5]"
    assert scorers.box_accuracy(pred, [.25, 0, .75, .5], scorers.REFCOCO_IOU) == 0.0
    assert scorers.box_accuracy(pred, [.25, 0, .75, .5], scorers.OCIDREF_IOU) == 1.0
    assert scorers.box_accuracy("no box", [0, 0, 1, 1], 0.25) == 0.0


def test_synonyms():
    assert scorers.synonym_accuracy("Sneakers.", ("sneaker", "sneakers")) == 1.0
    assert scorers.synonym_accuracy("a boot", ("ankle boot", "boot")) == 1.0
    assert scorers.synonym_accuracy("sandal", ("ankle boot", "boot")) == 0.0


def test_stable_score():
    # boolq 0.6 - 0.5 = 0.1, arc_easy 0.45 - 0.25 = 0.2, pubmedqa 1/3 - 1/3 = 0 -> mean 0.1
    assert stable_score({"boolq": 0.6, "arc_easy": 0.45, "pubmedqa": 1 / 3}) == pytest.approx(0.1)
    # POPE 0.7 - 0.5 = 0.2, free-form VQA 0.3 - 0 = 0.3 -> 0.25
    assert stable_score({"pope": 0.7, "vqav2": 0.3}) == pytest.approx(0.25)
    assert chance("hellaswag") == 0.25 and CHANCE["agieval_lsat_ar"] == 0.2
    with pytest.raises(KeyError, match="no chance level"):
        stable_score({"not_a_task": 0.5})
    with pytest.raises(ValueError, match="not in"):
        stable_score({"boolq": 55.0})
