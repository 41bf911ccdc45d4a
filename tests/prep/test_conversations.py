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
    with pytest.raises(DataError, match=r"d\.json: record 1 \(id b\): image 'nope.png' is not in"):
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
