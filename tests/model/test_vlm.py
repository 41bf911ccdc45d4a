"""VLM.forward on the document-boundary path: packed rows give each document exactly the hidden
states it has alone, match the plain-PyTorch reference (with its dense mask) for rows of one,
several and length-1 documents, padding and images, flattening unpacked rows changes nothing,
and bad inputs are refused. fp32, one process, ≤ 1e-5."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megavlm.config import load_config
from megavlm.data.batch import Sample, collate
from megavlm.model.reference import document_mask, reference_from_megatron
from megavlm.model.vlm import rotary_embedding, splice_images
from megavlm.train.step import model_inputs
from tests import synthetic

TOL = 1e-5
S = 32


@pytest.fixture(scope="module")
def built(parallel1):
    from megavlm.model.export import full_tensors
    from megavlm.train.loop import build_model

    run = load_config(raw=synthetic.tiny_run("unused", layers=2))
    (chunk,), _ = build_model(run, parallel1, torch.float32)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in chunk.parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return run, chunk.eval(), full_tensors([chunk])


def _doc(g, n):
    return Sample(g.integers(4, 100, size=n), np.ones(n, bool))


def _hidden(chunk, batch, **kw):
    """[B, S, d] final hidden states through the training layout."""
    B, S_ = batch.tokens.shape
    x = model_inputs(batch, "cpu", **kw)
    with torch.no_grad():
        h = chunk(x.tokens, x.position_ids, x.packed_seq_params, x.image_embeds, x.image_slots)
    return h.transpose(0, 1).reshape(B, S_, -1)


def test_each_document_sees_only_itself(built):
    """Every packed document's hidden states equal those of the document run alone."""
    _, chunk, _ = built
    g = np.random.default_rng(0)
    rows = [[_doc(g, 1), _doc(g, 9), _doc(g, 22)], [_doc(g, 5)] * 2 + [_doc(g, 1)] * 3, [_doc(g, S)]]
    packed = _hidden(chunk, collate(rows, S, synthetic.PAD))
    for r, docs in enumerate(rows):
        off = 0
        for d in docs:
            n = len(d.tokens)
            alone = collate([[d]], n, synthetic.PAD)  # one unpacked row of exactly the document
            assert alone.cu_seqlens is None
            want = _hidden(chunk, alone)[0]
            diff = (packed[r, off:off + n] - want).abs().max().item()
            assert diff <= TOL, f"row {r}, document at {off} (length {n}): {diff}"
            off += n


def test_flattened_unpacked_rows_equal_rows(built):
    _, chunk, _ = built
    g = np.random.default_rng(1)
    batch = collate([[_doc(g, S)] for _ in range(3)], S, synthetic.PAD)
    a = _hidden(chunk, batch)
    b = _hidden(chunk, batch, flatten_unpacked=True)
    assert (a - b).abs().max().item() <= TOL


@pytest.mark.parametrize("images", [False, True])
def test_packed_rows_equal_the_reference(built, images):
    run, chunk, full = built
    ref = reference_from_megatron(full, run.model).eval()
    P, W = run.model.vision.num_patches, run.model.vision.embed_dim
    rows = synthetic.global_rows(4, 1, 6, S, P, W, images)
    g = np.random.default_rng(2)
    rows.append([_doc(g, 1), _doc(g, 1), _doc(g, 3)])  # length-1 documents, padding at the end
    batch = collate(rows, S, synthetic.PAD, embed_dtype=None)
    B = batch.tokens.shape[0]
    x = ref.tok_embeddings(batch.tokens)
    if images:
        assert batch.image_embeds is not None
        e = batch.image_embeds.float()
        proj = F.gelu(e @ full["projector.fc1.weight"].t() + full["projector.fc1.bias"])
        proj = proj @ full["projector.fc2.weight"].t() + full["projector.fc2.bias"]
        x = x.detach().clone()
        for n, (row, start) in enumerate(batch.image_slots.tolist()):
            x[row, start:start + P] = proj[n]
    with torch.no_grad():
        want = ref(position_ids=batch.position_ids, inputs_embeds=x,
                   attention_mask=document_mask(batch.cu_seqlens, B, S))
        got = chunk.logits(_hidden(chunk, batch).transpose(0, 1))
    d = (got - want).abs().max().item()
    assert d <= TOL, d
    assert want.abs().max() > 0.1


def test_packed_params_need_the_flattened_layout(built):
    _, chunk, _ = built
    g = np.random.default_rng(3)
    batch = collate([[_doc(g, 10), _doc(g, 22)], [_doc(g, S)]], S, synthetic.PAD)
    x = model_inputs(batch, "cpu")
    with pytest.raises(ValueError, match=r"flattened to one sequence \[1, T\].*\(2, 32\)"):
        chunk(batch.tokens, batch.position_ids, x.packed_seq_params)


def test_rotary_and_splice_shapes():
    pos = torch.tensor([[0, 1, 2, 0, 1]])
    r = rotary_embedding(pos, 8, 10000.0)
    assert r.shape == (5, 1, 1, 8)
    assert torch.equal(r[3], r[0]) and torch.equal(r[4], r[1])  # positions restart: same angles
    emb = torch.zeros(6, 2, 4)
    out = splice_images(emb, torch.ones(1, 2, 4), torch.tensor([[1, 3]]))
    assert out[3:5, 1].eq(1).all() and out.sum() == 8
    with pytest.raises(ValueError, match="runs past the sequence"):
        splice_images(emb, torch.ones(1, 2, 4), torch.tensor([[0, 5]]))
