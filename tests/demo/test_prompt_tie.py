"""The demo teaches short answers with the very question text evaluation asks: its short-answer VQA
training turns (megavlm.demo.short_vqa) must be the evaluation template of a demo checkpoint
(the recipe's ``data.prompt_template``, which training records and megavlm.eval.api.resolve_prompt
reads back) filled with the offline suites' own questions (megavlm.demo.suites). If either side's
phrasing drifts, a tuned model is asked in words it never saw and scores near zero."""

from __future__ import annotations

import json

from megavlm.config import DEFAULT_PROMPT_TEMPLATE, load_config
from megavlm.demo import short_vqa, suites
from megavlm.experiment.demo import DEFAULT_CONFIG


def test_demo_training_questions_are_the_evaluation_template(tmp_path):
    template = load_config(DEFAULT_CONFIG).data.prompt_template
    assert template == DEFAULT_PROMPT_TEMPLATE  # the default evaluation falls back to for old checkpoints
    caps = tmp_path / "captions.jsonl"
    caps.write_text("".join(json.dumps(r) + "\n" for r in [
        {"image": "fashion-train-0.png", "caption": "A photo of a coat: an outer garment."},
        {"image": "fashion-train-1.png", "caption": "A photo of a dress: a one-piece garment."},
        {"image": "tux/wapiti.png", "caption": "A wapiti."}]))
    # the offline suite's questions about the same images (held-out in evaluation; same wording)
    recs = [("fashion-test-0.png", "A photo of a coat: x", "coat"), ("fashion-test-1.png", "A photo of a dress: x", "dress")]
    asked = {q.question for q in suites.build_fashion_vqa(recs) + suites.build_offline_pope(recs)}
    taught = [c["conversations"][0]["value"] for c in short_vqa.conversations(caps)]
    assert taught and all(t.startswith("<image>") for t in taught)
    trained_questions = set()
    for t in taught:
        text = t[len("<image>"):]
        prefix, suffix = template.split("{question}")
        assert text.startswith(prefix) and text.endswith(suffix), (t, template)
        q = text[len(prefix):len(text) - len(suffix)]
        assert template.format(question=q) == text
        trained_questions.add(q)
    assert "What is shown in the image?" in trained_questions & asked
    assert any(q.startswith("Is there") for q in trained_questions & asked)  # POPE's phrasing too
