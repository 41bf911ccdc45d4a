"""Conversations: masks (only model answers trained), separators, image references, errors."""
from __future__ import annotations

import json

import numpy as np
import pytest

from megavlm.prep.conversations import format_conversation, preprocess_conversations
from megavlm.data.indexed import DataError
from megavlm.data.sources import ConversationSource


def test_format_masks_everything_but_answers(tok):
    rec = {"image": "x.png", "system": "be brief",
           "conversations": [{"from": "human", "value": "<image>\nwhat is it?"},
                             {"from": "gpt", "value": "a cat"},
                             {"from": "human", "value": "sure?"}, {"from": "gpt", "value": "yes"}]}
    ids, tgt = format_conversation(rec, tok, "rec")
    sp = tok.special
    expect = ([sp.system] + tok.encode("be brief") + [sp.sep] + [sp.user] + tok.encode("what is it?") + [sp.sep]
              + [sp.assistant] + tok.encode("a cat") + [sp.sep] + [sp.user] + tok.encode("sure?") + [sp.sep]
              + [sp.assistant] + tok.encode("yes") + [sp.sep] + [sp.eod])
    assert ids == expect
    trained = [i for i, t in zip(ids, tgt) if t]
    assert trained == tok.encode("a cat") + [sp.sep] + tok.encode("yes") + [sp.sep] + [sp.eod]
    assert tok.image not in ids


@pytest.mark.parametrize("turns,extra,msg", [
    ([{"from": "human", "value": "hi"}], {}, "no model answer"),
    ([{"from": "human", "value": "hi"}, {"from": "bot", "value": "x"}], {}, "unknown role 'bot'"),
    ([{"from": "gpt", "value": "x"}], {}, "without a human turn"),
    ([{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "x"}], {}, "names no image"),
    ([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "  "}], {}, "empty model answer"),
])
def test_bad_conversations(tok, turns, extra, msg):
    with pytest.raises(DataError, match=f"rec 7: .*{msg}"):
        format_conversation({"conversations": turns, **extra}, tok, "rec 7")


def test_files_and_source(tmp_path, tok, corpus):
    recs = [{"id": "a", "image": "img3.png", "conversations": [{"from": "human", "value": "<image>\nq"},
                                                               {"from": "gpt", "value": "the answer"}]},
            {"id": "b", "conversations": [{"from": "human", "value": "text only"},
                                          {"from": "gpt", "value": "ok"}]}]
    (tmp_path / "c.json").write_text(json.dumps(recs))
    st = preprocess_conversations([tmp_path / "c.json"], tmp_path / "inst", tok,
                                  embeds=corpus / "captions.embeds")
    assert (st.conversations, st.with_image) == (2, 1)
    assert np.load(tmp_path / "inst.images.npy").tolist() == [3, -1]
    src = ConversationSource(tmp_path / "inst", tok, embed_dim=8, num_patches=4, seq_length=64)
    s0, s1 = src.sample(0), src.sample(1)
    assert s0.tokens[:5].tolist() == [tok.image] * 4 + [tok.sep] and not s0.target[:5].any()
    assert s0.image.shape == (4, 8) and s1.image is None
    assert src.lengths.tolist() == [len(s0.tokens), len(s1.tokens)]
    recs[1]["image"] = "nope.png"
    (tmp_path / "d.json").write_text(json.dumps(recs))
    with pytest.raises(DataError, match=r"not in .*\n  .*d\.json: record 2 \(id b\): image 'nope.png'"):
        preprocess_conversations([tmp_path / "d.json"], tmp_path / "bad", tok, embeds=corpus / "captions.embeds")
    assert not list(tmp_path.glob("bad*"))
    (tmp_path / "e.json").write_bytes(b'[{"conversations": "\xff"}]')
    with pytest.raises(DataError, match=r"e\.json: invalid UTF-8"):
        preprocess_conversations([tmp_path / "e.json"], tmp_path / "bad", tok)


def test_broken_jsonl_is_reported_at_its_line(tmp_path, tok):
    from megavlm.prep.conversations import load_llava

    good = json.dumps({"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]})
    (tmp_path / "c.jsonl").write_text(f"{good}\n\n{good}\n{{broken\n{good}\n")
    with pytest.raises(DataError, match=r"c\.jsonl:4: not valid JSON"):
        load_llava(tmp_path / "c.jsonl")


def test_embeds_accepts_either_spelling_of_the_store(tmp_path, tok, corpus):
    from megavlm.data.indexed import store_prefix

    assert store_prefix(corpus / "captions") == corpus / "captions.embeds"
    assert store_prefix(corpus / "captions.embeds") == corpus / "captions.embeds"
    assert store_prefix(corpus / "captions.embeds.json") == corpus / "captions.embeds"
    rec = {"id": "x", "image": json.loads((corpus / "captions.embeds.json").read_text())["keys"][0],
           "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "it"}]}
    (tmp_path / "c.json").write_text(json.dumps([rec]))
    for spelling in (corpus / "captions", corpus / "captions.embeds"):
        st = preprocess_conversations([tmp_path / "c.json"], tmp_path / "out", tok, embeds=spelling)
        assert st.with_image == 1


def _store(prefix, tok, seed, extra_first=0):
    """A small embedding store (keys img0.png ...), optionally with extra keys sorting first."""
    import torch

    from megavlm.data.indexed import EmbeddingWriter

    g = torch.Generator().manual_seed(seed)
    keys = [f"a{k}.png" for k in range(extra_first)] + [f"img{i}.png" for i in range(6)]
    with EmbeddingWriter(f"{prefix}.embeds", encoder="test", num_patches=4, embed_dim=8, image_size=32) as ew:
        for k in keys:
            ew.add(torch.randn(4, 8, generator=g), key=k)
    return keys


def _convs(path, n=6):
    path.write_text("".join(json.dumps({"id": f"c{i}", "image": f"img{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}) + "\n" for i in range(n)))


def test_conversations_name_images_by_key_and_a_changed_store_is_detected(tmp_path, tok):
    _store(tmp_path / "caps", tok, seed=1)
    _convs(tmp_path / "c.jsonl")
    preprocess_conversations([tmp_path / "c.jsonl"], tmp_path / "inst", tok, embeds=tmp_path / "caps")
    meta = json.loads((tmp_path / "inst.meta.json").read_text())
    assert meta["image_keys"] == [f"img{i}.png" for i in range(6)] and meta["store_fingerprint"].startswith("sha256:")
    src = ConversationSource(tmp_path / "inst", tok, embed_dim=8, num_patches=4, seq_length=64)
    assert src.images.tolist() == list(range(6))
    # re-encoded with 2 more images that sort first: every record number moved
    _store(tmp_path / "caps", tok, seed=1, extra_first=2)
    with pytest.raises(DataError, match=r"conversation set .*inst: embedding store .*caps\.embeds has changed.*"
                                         r"preprocess_conversations"):
        ConversationSource(tmp_path / "inst", tok, embed_dim=8, num_patches=4, seq_length=64)
    # same keys, other contents
    _store(tmp_path / "caps", tok, seed=2)
    with pytest.raises(DataError, match="has changed"):
        ConversationSource(tmp_path / "inst", tok, embed_dim=8, num_patches=4, seq_length=64)
    _store(tmp_path / "caps", tok, seed=1)  # the same contents again: accepted
    ConversationSource(tmp_path / "inst", tok, embed_dim=8, num_patches=4, seq_length=64)


def test_check_names_the_conversation_set_and_store_after_a_re_encode(tmp_path, tok, sp_model, capsys):
    import shutil

    import yaml

    from megavlm.cli import main as megavlm
    from tests.data.conftest import synthetic_text, write_text_dataset

    shutil.copy(sp_model, tmp_path / "tokenizer.model")
    write_text_dataset(tmp_path / "text", tok, synthetic_text(50, seed=1))
    _store(tmp_path / "caps", tok, seed=1)
    _convs(tmp_path / "c.jsonl")
    preprocess_conversations([tmp_path / "c.jsonl"], tmp_path / "inst", tok, embeds=tmp_path / "caps")
    recipe = {"run_dir": str(tmp_path / "run"),
              "model": {"num_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "ffn_hidden_size": 64,
                        "vocab_size": 512, "seq_length": 32,
                        "vision": {"embed_dim": 8, "num_patches": 4, "encoder": "test"}},
              "train": {"micro_batch_size": 2, "global_batch_size": 2, "precision": "fp32"},
              "data": {"root": str(tmp_path), "tokenizer": "tokenizer.model", "text": ["text"], "captions": [],
                       "instructions": ["inst"]},
              "stages": [{"name": "sft", "tokens": 256, "trainable": "all", "mixture": {"text": 0.0, "instructions": 1.0},
                          "schedule": {"kind": "cosine", "peak": 1e-3, "final": 1e-4, "warmup_steps": 1}}]}
    cfg = tmp_path / "r.yaml"
    cfg.write_text(yaml.safe_dump(recipe))
    assert megavlm(["train", "--config", str(cfg), "--check"]) == 0
    capsys.readouterr()
    _store(tmp_path / "caps", tok, seed=1, extra_first=1)
    assert megavlm(["train", "--config", str(cfg), "--check"]) != 0
    out = "".join(capsys.readouterr())
    assert f"conversation set {tmp_path / 'inst'}: embedding store {tmp_path / 'caps.embeds'} has changed" in out, out


def test_old_conversation_sets_without_keys_still_load(tmp_path, tok, caplog):
    _store(tmp_path / "caps", tok, seed=1)
    _convs(tmp_path / "c.jsonl")
    preprocess_conversations([tmp_path / "c.jsonl"], tmp_path / "inst", tok, embeds=tmp_path / "caps")
    meta_path = tmp_path / "inst.meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({"embeds": meta["embeds"], "conversations": 6}))  # the old layout
    with caplog.at_level("WARNING"):
        src = ConversationSource(tmp_path / "inst", tok, embed_dim=8, num_patches=4, seq_length=64)
    assert src.images.tolist() == list(range(6))
    assert "predates image keys" in caplog.text and "preprocess_conversations.py" in caplog.text


def test_every_missing_image_is_listed_by_its_line(tmp_path, tok):
    _store(tmp_path / "caps", tok, seed=1)
    _convs(tmp_path / "c.jsonl", n=9)  # img6..img8 are not in the store
    text = (tmp_path / "c.jsonl").read_text().splitlines()
    (tmp_path / "c.jsonl").write_text("\n".join(text[:3] + [""] + text[3:]) + "\n")  # a blank line 4
    with pytest.raises(DataError) as e:
        preprocess_conversations([tmp_path / "c.jsonl"], tmp_path / "inst", tok, embeds=tmp_path / "caps")
    msg = str(e.value)
    assert msg.startswith("3 conversation(s) name an image that is not in")
    for line, img in ((8, 6), (9, 7), (10, 8)):
        assert f"c.jsonl:{line} (id c{img}): image 'img{img}.png'" in msg
    assert not (tmp_path / "inst.bin").exists()
