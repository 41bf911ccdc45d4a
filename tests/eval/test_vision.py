"""Vision evaluation on the tiny checkpoint: generation and POPE against direct computations, the
offline suites on a small corpus in the demo's layout, the report, and each bad input's error."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from megavlm.data.indexed import EmbeddingWriter
from megavlm.demo import suites
from megavlm.eval import cli, scorers, vision
from megavlm.eval.runner import EvalError
from tests.eval.conftest import sentences

P, D = 4, 24  # tests/synthetic.py tiny_run: model.vision
FASHION = ["dress", "sneaker", "bag", "coat", "sandal", "trouser"]
STAMPS = ["cat", "camel", "apple", "bus"]


def write_store(prefix: Path, keys: list[str], encoder: str = "test-encoder", patches: int = P,
                width: int = D, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    with EmbeddingWriter(prefix, encoder=encoder, num_patches=patches, embed_dim=width, image_size=64) as w:
        for k in keys:
            w.add(torch.randn(patches, width, generator=g), k)
    return prefix


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    """A small corpus in the demo corpus's layout (raw/*.jsonl, captions_heldout.embeds, WordNet)."""
    root = tmp_path_factory.mktemp("demo")
    (root / "raw").mkdir()
    docs = [" ".join(sentences(6, seed)) for seed in range(8)]
    (root / "raw" / "text_heldout.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    recs = [{"image": f"/imgs/fashion-test-{i:05d}.png", "caption": f"A photo of a {w}: a thing to wear."}
            for i, w in enumerate(FASHION)]
    recs += [{"image": f"/stamps/{w}.png", "caption": f"A {w}."} for w in STAMPS]
    (root / "raw" / "captions_heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    write_store(root / "captions_heldout.embeds", [r["image"] for r in recs])
    wn = root / "wordnet"
    wn.mkdir()
    lines = ["  1 This is a license header line\n"]
    words = ["cat", "dog", "river", "stone", "house", "tree", "bird", "fish", "light", "apple", "camel", "boat"]
    for i, w in enumerate(words):
        lines.append(f"{i:08d} 05 n 01 {w} 0 000 | a kind of thing number {i} in the world; \"an example\"\n")
    (wn / "data.noun").write_text("".join(lines))
    return root


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    d = tmp_path_factory.mktemp("store")
    return vision.ImageBank(write_store(d / "imgs.embeds", ["/data/a/img0.png", "/data/a/img1.png",
                                                            "COCO_val2014_000000000042.jpg"]))


def greedy_direct(model, image: torch.Tensor, prompt: list[int], max_new: int) -> str:
    ids = model.image_prefix() + prompt
    start = len(ids)
    for _ in range(max_new):
        if len(ids) >= model.max_length:
            break
        with torch.no_grad():
            h = model.model(torch.tensor([ids]), torch.arange(len(ids))[None], None,
                            image[None], torch.tensor([[0, 0]]))
            nxt = int(model.model.logits(h)[0, -1].argmax())
        if nxt in (model.tok.sep, model.tok.eod):
            break
        ids.append(nxt)
    return model.tok.decode(ids[start:]).strip()


def test_image_lookup(bank):
    assert bank.lookup("/data/a/img1.png") == 1 and bank.lookup("img0.png") == 0
    assert bank.lookup("42") == 2 and bank.lookup("000042") == 2  # COCO image_id
    assert bank.lookup("img9.png") is None


def test_generation_matches_direct_greedy(loaded, bank):
    qs = [vision.VisionQuestion("q0", "img0.png", "What is shown in the image?", ("cat",) * 10),
          vision.VisionQuestion("q1", "img1.png", "What color is it?", ("red",) * 3 + ("blue",) * 7),
          vision.VisionQuestion("q2", "42", "How many?", ("2",) * 10)]
    res = vision.score_task("vqav2", loaded, qs, bank, "qs.json", max_new_tokens=5, template=vision.PROMPT)
    recs = bank.resolve(qs, "qs.json")
    for q, i, p in zip(qs, recs, res.predictions):
        want = greedy_direct(loaded, bank.tensor(i), vision.prompt_ids(loaded, q.question), 5)
        assert p["prediction"] == want
    assert res.accuracy == pytest.approx(np.mean([scorers.vqa_accuracy(p["prediction"], q.answers)
                                                  for p, q in zip(res.predictions, qs)]))
    # the image matters: the same question about another image is scored from different logits
    a = loaded.score([vision.ScoreRequest(vision.prompt_ids(loaded, "x"), loaded.encode("Yes"), bank.tensor(0))])
    b = loaded.score([vision.ScoreRequest(vision.prompt_ids(loaded, "x"), loaded.encode("Yes"), bank.tensor(1))])
    assert a[0].logprob != b[0].logprob


def test_pope_by_logprob(loaded, bank):
    qs = [vision.VisionQuestion(f"p{k}", f"img{k % 2}.png", q, label=lab, split=s)
          for k, (q, lab, s) in enumerate([("Is there a cat in the image?", True, "random"),
                                           ("Is there a dog in the image?", False, "random"),
                                           ("Is there a bus in the image?", True, "popular"),
                                           ("Is there a tree in the image?", False, "adversarial")])]
    res = vision.score_task("pope", loaded, qs, bank, "pope.jsonl", template=vision.PROMPT)
    preds = []
    for q in qs:
        i = bank.lookup(q.image)
        ctx = loaded.image_prefix() + vision.prompt_ids(loaded, q.question)
        lps = []
        for cont in (loaded.encode("Yes"), loaded.encode("No")):  # whole continuations, unbatched
            ids = ctx + cont
            with torch.no_grad():
                h = loaded.model(torch.tensor([ids]), torch.arange(len(ids))[None], None,
                                 bank.tensor(i)[None], torch.tensor([[0, 0]]))
                lp = torch.log_softmax(loaded.model.logits(h)[0].float(), -1)
            lps.append(sum(float(lp[t - 1, ids[t]]) for t in range(len(ctx), len(ids))))
        preds.append(lps[0] > lps[1])
    assert [p["prediction"] == "yes" for p in res.predictions] == preds
    per = {s: np.mean([p == q.label for p, q in zip(preds, qs) if q.split == s]) for s in ("random", "popular", "adversarial")}
    assert res.metrics["per_split"] == pytest.approx(per)
    assert res.accuracy == pytest.approx(np.mean(list(per.values())))


def test_readers(tmp_path):
    (tmp_path / "q.json").write_text(json.dumps({"questions": [{"image_id": 42, "question": "How many?", "question_id": 7}]}))
    (tmp_path / "a.json").write_text(json.dumps({"annotations": [{"question_id": 7, "answers": [{"answer": "2"}] * 10}]}))
    (q,) = vision.read_vqav2(tmp_path / "q.json", tmp_path / "a.json")
    assert (q.qid, q.image, q.answers) == ("7", "COCO_val2014_000000000042.jpg", ("2",) * 10)
    (tmp_path / "gqa.json").write_text(json.dumps({"201": {"imageId": "n1", "question": "Is it red?", "answer": "no"}}))
    assert vision.read_gqa(tmp_path / "gqa.json")[0].answers == ("no",)
    (tmp_path / "pope_adversarial.jsonl").write_text(json.dumps({"question_id": 1, "image": "x.jpg", "text": "Is there a cat?", "label": "yes"}) + "\n")
    (p,) = vision.read_pope(tmp_path / "pope_adversarial.jsonl")
    assert p.label is True and p.split == "adversarial"
    (tmp_path / "ref.jsonl").write_text(json.dumps({"image": "x.jpg", "expression": "left cup", "bbox": [0, 0, .5, .5]}) + "\n")
    assert vision.read_refer(tmp_path / "ref.jsonl")[0].box == (0, 0, .5, .5)
    (tmp_path / "tv.json").write_text(json.dumps({"data": [{"question_id": 3, "image_id": "ab", "question": "What brand?", "answers": ["acme"] * 10}]}))
    assert vision.read_textvqa(tmp_path / "tv.json")[0].image == "train_images/ab.jpg"
    with pytest.raises(EvalError, match="not a VQAv2 question file"):
        vision.read_vqav2(tmp_path / "gqa.json")


def test_offline_suite_builders(demo_root):
    src = suites.Sources.default(demo_root, demo_root / "wordnet")
    bank, recs = suites._heldout_images(src)
    fashion = suites.build_fashion_vqa(recs)
    assert [q.answers[0] for q in fashion] == FASHION
    pope = suites.build_offline_pope(recs)
    for split in ("random", "popular"):
        labels = [q.label for q in pope if q.split == split]
        assert len(labels) == len(recs) and sum(labels) == (len(labels) + 1) // 2  # balanced
    for q in pope:
        present = q.question.split("Is there ")[1].split(" in the image")[0].split(" ", 1)[1]
        label = dict((i, l) for i, _, l in recs)[q.image]
        assert (present == label) == q.label
    docs = suites.build_wordnet_mc(demo_root / "wordnet", n=5)
    assert len(docs) == 5 and all(len(d["choices"]) == 4 for d in docs)
    for d in docs:
        assert d["choices"][d["label"]].strip() in d["definition"] or "number" in d["definition"]
    cloze = suites.build_heldout_cloze(demo_root / "raw" / "text_heldout.jsonl", n=10)
    assert len(cloze) == 10 and all(0 <= d["label"] < 4 for d in cloze)


def test_eval_all_writes_report(tiny_checkpoint, demo_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rc = cli.main(["all", "--checkpoint", str(tiny_checkpoint), "--demo-root", str(demo_root),
                   "--wordnet", str(demo_root / "wordnet"), "--limit", "6", "--out-dir", str(tmp_path)],
                  offline=suites.OfflineSuite.default)
    out = capsys.readouterr()
    assert rc == 0, out.err
    rep = json.loads((tmp_path / "text-step_0000003.json").read_text())
    assert set(rep["text"]) == set(suites.TEXT_SUITE)
    assert set(rep["vision"]) == set(suites.VISION_SUITE)
    accs = [r["accuracy"] for r in rep["text"].values()]
    assert rep["stable_score"]["text"] == pytest.approx(np.mean(accs) - 0.25)
    v = rep["vision"]
    assert rep["stable_score"]["vision"] == pytest.approx(((v["fashion_vqa"]["accuracy"] - 0)
                                                           + (v["offline_pope"]["accuracy"] - 0.5)) / 2)
    assert v["tuxpaint_caption_ppl"]["perplexity"] > 1
    md = (tmp_path / "text-step_0000003.md").read_text()
    assert "Stable score" in md and "megavlm_wordnet_mc" in md


# -- bad input: one clear error each ---------------------------------------------------------


def test_missing_image(loaded, bank, tmp_path):
    qs = [vision.VisionQuestion("q9", "nowhere.png", "What?", ("x",))]
    with pytest.raises(EvalError, match=r"qs.json: question q9 references image 'nowhere.png', which is not in"):
        vision.score_task("generic", loaded, qs, bank, "qs.json", template=vision.PROMPT)


def test_store_from_other_encoder(loaded, tmp_path, tiny_checkpoint):
    wide = vision.ImageBank(write_store(tmp_path / "wide", ["a.png"], width=32))
    with pytest.raises(EvalError, match=r"expects 4 patches of width 24"):
        vision.check_store(wide.store, loaded)
    # same shape, other encoder than the run's training caption store
    root = Path(loaded.run.data.resolve("x")).parent
    write_store(root / "captions.embeds", ["t.png"], encoder="enc-a")
    try:
        other = vision.ImageBank(write_store(tmp_path / "other", ["a.png"], encoder="enc-b"))
        with pytest.raises(EvalError, match=r"made with encoder='enc-b', but checkpoint .* trained on "
                                            r"encoder='enc-a'"):
            vision.check_store(other.store, loaded)
        vision.check_store(vision.ImageBank(write_store(tmp_path / "same", ["a.png"], encoder="enc-a")).store, loaded)
    finally:
        for f in root.glob("captions.embeds.*"):
            f.unlink()


def test_checkpoint_without_tokenizer(tiny_checkpoint, tmp_path, capsys):
    bad = tmp_path / "step_0000003"
    shutil.copytree(tiny_checkpoint, bad)
    shutil.rmtree(bad / "tokenizer")
    rc = cli.main(["vision", "--checkpoint", str(bad)])
    assert rc == 2 and "checkpoint has no tokenizer" in capsys.readouterr().err


def test_cli_vision_task_with_missing_image(tiny_checkpoint, tmp_path, capsys):
    store = write_store(tmp_path / "imgs.embeds", ["/x/a.png"])
    q = tmp_path / "qs.jsonl"
    q.write_text(json.dumps({"question_id": 1, "image": "/x/a.png", "question": "What?", "answers": ["a"]}) + "\n"
                 + json.dumps({"question_id": 2, "image": "/x/b.png", "question": "What?", "answers": ["b"]}) + "\n")
    rc = cli.main(["vision", "--checkpoint", str(tiny_checkpoint), "--task", "generic", "--questions", str(q),
                   "--embeds", str(store)])
    err = capsys.readouterr().err
    assert rc == 2 and "question 2 references image '/x/b.png'" in err


def test_cli_refcoco_from_refs_pickle(tiny_checkpoint, tmp_path, capsys):
    from tests.eval.layouts import write_refcoco

    refs, _ = write_refcoco(tmp_path)  # instances.json beside it
    store = write_store(tmp_path / "coco.embeds", ["COCO_train2014_000000581857.jpg"])
    out = tmp_path / "res.json"
    rc = cli.main(["vision", "--checkpoint", str(tiny_checkpoint), "--task", "refcoco", "--questions", str(refs),
                   "--embeds", str(store), "--max-new-tokens", "4", "--output-path", str(out)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads(out.read_text())["refcoco"]
    assert res["n"] == 2 and [p["qid"] for p in res["predictions"]] == ["0-0", "0-1"]
    assert all(p["score"] == scorers.box_accuracy(p["prediction"], (0.1, 0.1, 0.6, 0.6), 0.5)
               for p in res["predictions"])


def test_scoring_calls_the_library_with_an_explicit_template(tiny_checkpoint, demo_root, tmp_path, capsys,
                                                             monkeypatch):
    """experiment.scoring (the sweep's and the demo's seam) reaches evaluation through
    megavlm.eval.api.evaluate, not an argv: the template given is the one every vision question
    was asked with and the report records it; nothing is printed."""
    from megavlm.experiment import scoring

    seen = []
    real = vision.generate_answers

    def spy(m, qs, b, r, n, template):
        seen.append(template)
        return real(m, qs, b, r, n, template)

    monkeypatch.setattr(vision, "generate_answers", spy)
    # the offline suites read WordNet where the demo build extracts it: point that at the fixture's
    # (a fresh HOME has no demo build)
    wn = tmp_path / "cache" / "debs" / "extract" / "wordnet-base" / "usr/share/wordnet"
    wn.mkdir(parents=True)
    shutil.copy(demo_root / "wordnet" / "data.noun", wn / "data.noun")
    monkeypatch.setenv("MEGAVLM_CACHE", str(tmp_path / "cache"))
    out = scoring.evaluate_checkpoint(tiny_checkpoint, tmp_path / "ev", demo_root=str(demo_root), limit=2,
                                      batch_size=4, prompt_template="\nQ: {question}")
    assert capsys.readouterr().out == ""
    assert seen and set(seen) == {"\nQ: {question}"}
    assert out["prompt"] == {"template": "\nQ: {question}", "source": "argument"}
    assert set(out["text"]) == set(suites.TEXT_SUITE) and "fashion_vqa" in out["vision"]
    rep = json.loads(Path(out["report"]).read_text())
    assert rep["prompt_template"] == "\nQ: {question}"
    with pytest.raises(scoring.ScoringError, match="must contain"):
        scoring.evaluate_checkpoint(tiny_checkpoint, tmp_path / "ev", demo_root=str(demo_root),
                                    prompt_template="no placeholder")
