"""lmms-eval end to end, offline: two local tasks over the demo's held-out images (generate_until
and multiple_choice/loglikelihood), run by the real harness on a tiny checkpoint whose recorded
encoder (EfficientNet-Lite0) encodes the PIL images; results checked against direct computation."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

lmms_eval = pytest.importorskip("lmms_eval", reason="lmms-eval (extra 'lmms') is not installed")

from megavlm.eval.runner import EvalError  # noqa: E402
from tests.eval.layouts import source_images  # noqa: E402

QUESTIONS = ["What is shown in the image?", "Is there a dress in the image?", "What color is it?",
             "Is there a cat in the image?"]
UTILS = '''
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"] + "\\nAnswer the question using a single word or phrase."


def process_results(doc, results):
    return {"exact": float(results[0].strip().lower() == doc["answer"])}
'''
GEN_YAML = """task: megavlm_local_vqa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 5
  until: ["."]
process_results: !function utils.process_results
metric_list:
  - metric: exact
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""
MC_YAML = """task: megavlm_local_yesno
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_choice: ["Yes", "No"]
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory):
    d = tmp_path_factory.mktemp("lmms_tasks")
    docs = []
    for k, (q, im) in enumerate(zip(QUESTIONS, source_images(len(QUESTIONS), seed=7))):
        p = d / f"img{k}.png"
        im.save(p)
        docs.append({"image": str(p), "question": q, "answer": "dress", "label": k % 2})
    data = d / "docs.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in docs))
    (d / "utils.py").write_text(UTILS)
    (d / "megavlm_local_vqa.yaml").write_text(GEN_YAML.format(data=data))
    (d / "megavlm_local_yesno.yaml").write_text(MC_YAML.format(data=data))
    return d, docs


def direct(model, docs):
    """Greedy answers and yes/no choices computed without lmms-eval."""
    from PIL import Image

    from megavlm.encoders import decode_pil, make_encoder, mean_fill
    from megavlm.eval.vision import prompt_ids

    enc = make_encoder("efficientnet-lite0", 64)
    answers, picks, logps = [], [], []
    for doc in docs:
        # letterboxed, as the checkpoint's training stores were (encoder_checkpoint records it)
        px = decode_pil(open(doc["image"], "rb").read(), 64, resize="letterbox", fill=mean_fill(enc.mean))
        assert px.shape == np.asarray(Image.open(doc["image"]).convert("RGB").resize((64, 64))).shape
        img = enc(px[None])[0]
        text = doc["question"] + "\nAnswer the question using a single word or phrase."
        ctx = prompt_ids(model, text, "\n{question}")
        ids = model.image_prefix() + ctx
        start = len(ids)
        for _ in range(5):
            with torch.no_grad():
                h = model.model(torch.tensor([ids]), torch.arange(len(ids))[None], None, img[None],
                                torch.tensor([[0, 0]]))
                nxt = int(model.model.logits(h)[0, -1].argmax())
            if nxt in (model.tok.sep, model.tok.eod):
                break
            ids.append(nxt)
            if "." in model.tok.decode(ids[start:]):
                break
        answers.append(model.tok.decode(ids[start:]).split(".")[0].strip())
        lps = []
        for choice in (" Yes", " No"):
            full = model.image_prefix() + ctx + model.encode(choice)
            with torch.no_grad():
                h = model.model(torch.tensor([full]), torch.arange(len(full))[None], None, img[None],
                                torch.tensor([[0, 0]]))
                lp = torch.log_softmax(model.model.logits(h)[0].float(), -1)
            lps.append(sum(float(lp[t - 1, full[t]]) for t in range(start, len(full))))
        picks.append(int(np.argmax(lps)))
        logps.append(lps)
    return answers, picks, logps


def test_lmms_eval_runs_megavlm(encoder_checkpoint, local_tasks, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import filelock
    from lmms_eval import evaluator
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    if not hasattr(filelock, "_api"):
        # lmms-eval 0.7.3's evaluator patches filelock 3.x internals (filelock._api) that filelock 4
        # no longer has; this machine has filelock 4 (shared by other tools), so its patch — a guard
        # against nested hub downloads deadlocking, moot for local files — is marked done.
        monkeypatch.setattr(evaluator._enable_reentrant_filelocks, "_patched", True, raising=False)

    from megavlm.eval import lmms_adapter

    lmms_adapter.register()
    d, docs = local_tasks
    tm = TaskManager("ERROR", include_path=str(d), include_defaults=False)
    out = simple_evaluate(model="megavlm", model_args=f"checkpoint={encoder_checkpoint},batch_size=3",
                          tasks=["megavlm_local_vqa", "megavlm_local_yesno"], task_manager=tm,
                          log_samples=True, bootstrap_iters=0, verbosity="ERROR")
    lm = lmms_adapter.MegavlmLMMS(checkpoint=str(encoder_checkpoint))
    answers, picks, logps = direct(lm.model, docs)
    got = [s["resps"][0][0] for s in sorted(out["samples"]["megavlm_local_vqa"], key=lambda s: s["doc_id"])]
    assert [g.strip() for g in got] == answers
    mc = sorted(out["samples"]["megavlm_local_yesno"], key=lambda s: s["doc_id"])
    for sample, want in zip(mc, logps, strict=True):  # the image reached the model: same log-likelihoods
        got_lp = [r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for r in sample["resps"]]
        assert got_lp == pytest.approx(want, rel=1e-4, abs=1e-4)
    res = out["results"]
    assert res["megavlm_local_vqa"]["exact,none"] == pytest.approx(np.mean([a == "dress" for a in answers]))
    assert res["megavlm_local_yesno"]["acc,none"] == pytest.approx(
        np.mean([p == doc["label"] for p, doc in zip(picks, docs)]))


def test_refuses_other_encoder_and_no_record(encoder_checkpoint, tiny_checkpoint):
    from megavlm.eval import lmms_adapter

    with pytest.raises(EvalError, match=r"model_args encoder='siglip:x', but checkpoint .* was trained on "
                                        r"'efficientnet-lite0'"):
        lmms_adapter.MegavlmLMMS(checkpoint=str(encoder_checkpoint), encoder="siglip:x")
    with pytest.raises(EvalError, match=r"records no image encoder"):
        lmms_adapter.MegavlmLMMS(checkpoint=str(tiny_checkpoint))


def test_entry_point_payload_resolves():
    """What setup.py's ``lmms_eval.models`` entry point names loads as lmms-eval expects."""
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    from megavlm.eval import lmms_adapter

    reg = ModelRegistryV2()
    for m in reg._coerce_payload_to_manifests(lmms_adapter.manifest):
        reg.register_manifest(m)
    assert reg.get_model_class("megavlm") is lmms_adapter.MegavlmLMMS
