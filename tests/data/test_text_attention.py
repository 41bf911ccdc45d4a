"""stages.<i>.text_attention (issue 25): ``document`` rows are what they always were; ``window``
rows hold the same tokens, images and counts, but a row's text is one causal window — one
cu_seqlens segment, positions running through its documents, every document end predicting the
next document's first token — while caption and instruction samples stay per document."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megavlm.config import DataConfig, MixtureConfig, VisionConfig
from megavlm.data.batch import Sample, collate
from megavlm.data.indexed import DataError
from megavlm.data.mixture import TEXT, LoaderSpec, text_window
from megavlm.train.plan import build_loader

P, D, SEQ = 4, 8, 96
VISION = VisionConfig(embed_dim=D, num_patches=P)
STATS = ("text_positions", "caption_positions", "instruction_positions", "image_sample_positions",
         "patch_positions")


def loader(root, text_attention=None, *, text=0.6, captions=0.25, instructions=0.15):
    data = DataConfig(root=str(root), instructions=["instructions"])
    kw = {} if text_attention is None else {"text_attention": text_attention}
    spec = LoaderSpec(stage="image", data=data, vision=VISION, seq_length=SEQ, seed=11,
                      mixture=MixtureConfig(text=text, captions=captions, instructions=instructions), **kw)
    return build_loader(spec, micro_batch_size=2, num_microbatches=2)


def equal(a, b) -> bool:
    for f in ("tokens", "labels", "loss_mask", "position_ids", "image_slots", "cu_seqlens"):
        x, y = getattr(a, f), getattr(b, f)
        if (x is None) != (y is None) or (x is not None and not torch.equal(x, y)):
            return False
    return True


def test_document_rows_are_unchanged(corpus):
    """The default is document, and its batches are the per-piece collation of the plan: every
    text piece restarts positions (and is its own cu_seqlens segment)."""
    default, doc = loader(corpus), loader(corpus, "document")
    assert default.text_attention == "document"
    replay = loader(corpus).planner
    for _ in range(3):
        a, b = default.next_step(), doc.next_step()
        assert all(equal(x, y) for x, y in zip(a, b))
        for batch in b:  # rebuilt from the plan, one Sample per piece, as before issue 25
            rows = []
            for _ in range(2):
                samples = []
                for kind, i, off, n in replay.plan_row():
                    src = doc.sources[kind]
                    samples.append(src.sample(i, off, n) if kind == TEXT else src.sample(i))
                rows.append(samples)
            assert equal(batch, collate(rows, SEQ, doc.tokenizer.pad, doc.embed_dtype))


def test_window_rows_join_text_and_keep_heads_per_document(corpus):
    doc, win = loader(corpus, "document"), loader(corpus, "window")
    eod = doc.tokenizer.eod
    crossings = 0
    for _ in range(4):
        a, b = doc.next_step(), win.next_step()
        assert doc.last_stats == win.last_stats  # same plan, same counts
        for x, y in zip(a, b):
            assert torch.equal(x.tokens, y.tokens) and torch.equal(x.image_slots, y.image_slots)
            assert torch.equal(x.image_embeds.view(torch.int16), y.image_embeds.view(torch.int16))
            heads = x.image_position_mask(P)
            for r in range(x.tokens.shape[0]):
                # the text of a row is its tail after the caption/instruction samples: find where
                # the window starts from the document-mode boundaries of this row
                lo, hi = r * SEQ, (r + 1) * SEQ
                bx = [int(v) - lo for v in x.cu_seqlens.tolist() if lo <= v <= hi]
                by = [int(v) - lo for v in y.cu_seqlens.tolist() if lo <= v <= hi]
                assert set(by) <= set(bx)  # window only removes boundaries
                removed = sorted(set(bx) - set(by))
                if not removed:
                    continue
                start = max(v for v in by if v < removed[0])  # the window's first position
                end = min(v for v in by if v > removed[-1])
                n = end - start
                assert torch.equal(y.position_ids[r, start:end], torch.arange(n))
                assert torch.equal(y.labels[r, start:end - 1], y.tokens[r, start + 1:end])
                assert y.loss_mask[r, start:end - 1].all() and y.loss_mask[r, end - 1] == 0
                for cut in removed:  # a document end (EOD) now predicts the next document's start
                    assert x.loss_mask[r, cut - 1] == 0 and x.position_ids[r, cut] == 0
                    assert y.position_ids[r, cut] == cut - start
                    crossings += int(y.tokens[r, cut - 1] == eod)
                # everything before the window (captions, conversations) is as in document mode
                for f in ("labels", "loss_mask", "position_ids"):
                    assert torch.equal(getattr(x, f)[r, :start], getattr(y, f)[r, :start]), f
                assert not heads[r, start:end].any()
    assert crossings > 3, "no text window crossed a document end: the test saw nothing"


def test_text_window_leaves_heads_alone():
    t = lambda n, v: Sample(np.full(n, v), np.ones(n, bool))  # noqa: E731
    cap = Sample(np.arange(6), np.array([0, 0, 1, 1, 1, 1], bool), image=np.zeros((2, 3)), source="captions")
    out = text_window([cap, t(3, 7), t(2, 8), t(4, 9)])
    assert out[0] is cap and len(out) == 2
    assert out[1].tokens.tolist() == [7, 7, 7, 8, 8, 9, 9, 9, 9] and out[1].source == "text"
    single = t(5, 1)
    assert text_window([single])[0] is single


def test_loader_state_names_the_mode(corpus):
    win = loader(corpus, "window")
    win.next_step()
    state = win.state_dict()
    assert state["text_attention"] == "window"
    assert "text_attention" not in loader(corpus).state_dict()  # older states stay loadable
    with pytest.raises(DataError, match="text_attention=window"):
        loader(corpus, "document").load_state_dict(state)
    again = loader(corpus, "window")
    again.load_state_dict(state)
    assert all(equal(x, y) for x, y in zip(win.next_step(), again.next_step()))
    with pytest.raises(ValueError, match="text_attention 'packed'"):
        loader(corpus, "packed")
