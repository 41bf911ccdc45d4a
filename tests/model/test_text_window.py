"""text_attention: window (issue 25) through the trainer's model: the text window of a packed row
computes exactly what an unpacked causal forward over the concatenated documents computes (what
open_lm does with a window of DCLM text), a caption sample before it still sees only itself, and
document mode differs (so the comparison can fail). fp32, one process, <= 1e-5."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megavlm.config import load_config
from megavlm.data.batch import Sample, collate
from megavlm.data.mixture import text_window
from megavlm.train.step import model_inputs
from megavlm.bench.synthetic import IDS
from tests import synthetic

TOL = 1e-5
S = 48


@pytest.fixture(scope="module")
def chunk(parallel1):
    from megavlm.train.loop import build_model

    run = load_config(raw=synthetic.tiny_run("unused", layers=2))
    (c,), _ = build_model(run, parallel1, torch.float32)
    return run, c.eval()


def _hidden(chunk, batch):
    B, S_ = batch.tokens.shape
    x = model_inputs(batch, "cpu")
    with torch.no_grad():
        h = chunk(x.tokens, x.position_ids, x.packed_seq_params, x.image_embeds, x.image_slots)
    return h.transpose(0, 1).reshape(B, S_, -1)


def _text(g, n):
    return Sample(g.integers(4, 100, size=n), np.ones(n, bool))


def _caption(run, g, n):
    P, W = run.model.vision.num_patches, run.model.vision.embed_dim
    toks = np.concatenate([np.full(P, IDS.image), [IDS.sep], g.integers(4, 100, size=n)])
    target = np.concatenate([np.zeros(P + 1, bool), np.ones(n, bool)])
    image = torch.randn(P, W, generator=torch.Generator().manual_seed(int(g.integers(1 << 30))))
    return Sample(toks, target, image=image.to(torch.bfloat16).view(torch.uint16).numpy(),
                  source="captions")


def test_window_equals_unpacked_causal_forward_over_the_concatenation(chunk):
    run, c = chunk
    g = np.random.default_rng(5)
    cap = _caption(run, g, 6)
    text_only = [_text(g, 7), _text(g, 1), _text(g, 13), _text(g, 9)]  # 30 positions, then padding
    after_cap = [_text(g, 11), _text(g, 5), _text(g, 8)]
    rows = [text_only, [cap] + after_cap, [_text(g, 20), _text(g, S - 20)]]  # the last row is full
    win = collate([text_window(r) for r in rows], S, synthetic.PAD)
    doc = collate(rows, S, synthetic.PAD)
    h_win, h_doc = _hidden(c, win), _hidden(c, doc)
    worst_doc = 0.0
    for r, row in enumerate(rows):
        start = sum(len(s.tokens) for s in row if s.source != "text")
        texts = [s for s in row if s.source == "text"]
        concat = np.concatenate([s.tokens for s in texts])
        n = len(concat)
        alone = collate([[Sample(concat, np.ones(n, bool))]], n, synthetic.PAD)
        assert alone.cu_seqlens is None  # one plain causal row, positions 0..n-1
        want = _hidden(c, alone)[0]
        diff = (h_win[r, start:start + n] - want).abs().max().item()
        assert diff <= TOL, f"row {r}: window vs causal forward over the concatenation: {diff}"
        worst_doc = max(worst_doc, (h_doc[r, start:start + n] - want).abs().max().item())
        if start:  # the caption in front still sees only itself, in both modes
            cap_alone = _hidden(c, collate([[row[0]]], start, synthetic.PAD))[0]
            for h in (h_win, h_doc):
                assert (h[r, :start] - cap_alone).abs().max().item() <= TOL
    assert worst_doc > 1e-2, "document mode should differ from the concatenated forward"
    assert win.cu_seqlens is not None and doc.cu_seqlens is not None
    assert len(win.cu_seqlens) < len(doc.cu_seqlens)
