"""The demo's short-answer VQA records: labels from captions, balanced yes/no, the benchmark prompt."""

from __future__ import annotations

import json

from megavlm.demo.short_vqa import SUFFIX, conversations, label_of


def test_short_vqa_labels_and_records(tmp_path):
    assert label_of("A photo of an ankle boot: a shoe that covers the ankle.") == "ankle boot"
    assert label_of("A wapiti.") == "wapiti"
    assert label_of("Penguins are wining!") == "penguins are wining"
    assert label_of("The tender carries water and coal for the engine.") is None
    assert label_of("“Give Way” means stop.") is None
    caps = tmp_path / "captions.jsonl"
    caps.write_text("\n".join(json.dumps(r) for r in [
        {"image": "a.png", "caption": "A photo of a coat: a garment."},
        {"image": "b.png", "caption": "A bear."},
        {"image": "c.png", "caption": "A long sentence that has no short label at all."}]) + "\n")
    recs = conversations(caps)
    assert len(recs) == 4  # two per labelled image, none for c.png
    what = [r for r in recs if r["id"].startswith("vqa-what")]
    assert [(r["image"], r["conversations"][1]["value"]) for r in what] == [("a.png", "coat"), ("b.png", "bear")]
    yn = [r for r in recs if r["id"].startswith("vqa-yesno")]
    assert [r["conversations"][1]["value"] for r in yn] == ["Yes", "No"]
    assert "Is there a coat" in yn[0]["conversations"][0]["value"] and "coat" in yn[1]["conversations"][0]["value"]
    assert all(r["conversations"][0]["value"].startswith("<image>\n") and r["conversations"][0]["value"].endswith(SUFFIX)
               for r in recs)
