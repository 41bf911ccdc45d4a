"""The megatron-core DCLM model equals the independent plain-PyTorch reference (fp32, ≤ 1e-5).

The megavlm model is built on one process (the session's shared parallel context), every norm
gain and projector bias is perturbed away from its init value so layout mistakes in gains can
show, its full tensors are converted to OpenLM names and loaded into
megavlm.model.reference.ReferenceDCLM. Logits are compared for plain causal rows, packed rows
(two documents, restarting positions; megatron on the document-boundary path, the reference
with a block-diagonal causal mask) and rows with images spliced
(the reference receives input embeddings with the images projected by a plain-PyTorch MLP).
A per-head qk-norm in the reference must break the equality: the test can fail.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megavlm.config import load_config
from megavlm.model.reference import (ReferenceDCLM, document_bounds, document_mask, from_openlm_names, qkv_megatron_to_openlm,
                                     reference_from_megatron, to_openlm_names)
from tests import synthetic

TOL = 1e-5


@pytest.fixture(scope="module")
def built(parallel1):
    from megavlm.model.export import full_tensors
    from megavlm.model.build import build_model

    raw = synthetic.tiny_run("unused", layers=2)
    run = load_config(raw=raw)
    chunks, _ = build_model(run, parallel1, torch.float32)
    (chunk,) = chunks
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in chunk.named_parameters():
            if p.ndim == 1:  # gains (and projector biases): not all ones / zeros any more
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    chunk.eval()
    return run, chunk, full_tensors(chunks)


def _batch(run, images: bool, step: int):
    from megavlm.data.batch import collate

    S, P, W = run.model.seq_length, run.model.vision.num_patches, run.model.vision.embed_dim
    rows = synthetic.global_rows(11, step, 4, S, P, W, images)
    return collate(rows, S, synthetic.PAD, embed_dtype=None)


def _megatron_logits(chunk, batch):
    """Logits [B, S, V] through the training path: packed rows flattened to one sequence with
    their document boundaries (megavlm.train.step.model_inputs), no mask."""
    from megavlm.train.step import model_inputs

    B, S = batch.tokens.shape
    x = model_inputs(batch, "cpu")
    with torch.no_grad():
        hidden = chunk(x.tokens, x.position_ids, x.packed_seq_params, x.image_embeds, x.image_slots)
        return chunk.logits(hidden).reshape(B, S, -1)


def _reference_logits(ref, full, batch, run):
    mask = document_mask(document_bounds(batch.position_ids), *batch.position_ids.shape) if batch.cu_seqlens is not None else None
    x = ref.tok_embeddings(batch.tokens)
    if batch.image_embeds is not None:
        e = batch.image_embeds.float()
        proj = F.gelu(e @ full["projector.fc1.weight"].t() + full["projector.fc1.bias"])
        proj = proj @ full["projector.fc2.weight"].t() + full["projector.fc2.bias"]
        x = x.clone()
        P = run.model.vision.num_patches
        for n, (row, start) in enumerate(batch.image_slots.tolist()):
            x[row, start:start + P] = proj[n]
    with torch.no_grad():
        return ref(position_ids=batch.position_ids, attention_mask=mask, inputs_embeds=x)


@pytest.mark.parametrize("case", ["causal", "packed", "images"])
def test_reference_logits_equal_megatron(built, case):
    run, chunk, full = built
    ref = reference_from_megatron(full, run.model).eval()
    if case == "causal":
        B, S = 3, run.model.seq_length
        g = torch.Generator().manual_seed(5)
        tokens = torch.randint(0, run.model.vocab_size, (B, S), generator=g)
        pos = torch.arange(S).expand(B, S).contiguous()
        with torch.no_grad():
            got = chunk.logits(chunk(tokens, pos, None))
            want = ref(tokens, pos)
    else:
        batch = _batch(run, images=case == "images", step=3)
        assert batch.cu_seqlens is not None  # packed rows are in the batch
        if case == "images":
            assert batch.image_embeds is not None and batch.image_embeds.shape[0] >= 1
        got = _megatron_logits(chunk, batch)
        want = _reference_logits(ref, full, batch, run)
    assert got.shape == want.shape
    d = (got - want).abs().max().item()
    assert d <= TOL, f"{case}: logits differ by {d}"
    assert want.abs().max().item() > 0.1  # not a vacuous comparison of near-zero logits


def test_per_head_qk_norm_would_fail(built):
    """The comparison discriminates: OpenLM's full-width qk-norm replaced by a per-head one
    (megatron's own qk-norm semantics) moves the logits far beyond the tolerance."""
    run, chunk, full = built
    ref = reference_from_megatron(full, run.model).eval()
    H, hd = run.model.num_attention_heads, run.model.head_dim

    def per_head(norm):
        def forward(x):
            y = F.layer_norm(x.unflatten(-1, (H, hd)), (hd,), None, None, norm.eps)
            return y.flatten(-2) * norm.weight
        return forward

    for layer in ref.layers:
        layer.attention.q_norm.forward = per_head(layer.attention.q_norm)
        layer.attention.k_norm.forward = per_head(layer.attention.k_norm)
    batch = _batch(run, images=False, step=4)
    d = (_megatron_logits(chunk, batch) - _reference_logits(ref, full, batch, run)).abs().max().item()
    assert d > 100 * TOL, f"per-head qk-norm is indistinguishable (max diff {d})"


def test_name_conversion_round_trips_and_is_complete(built):
    run, _, full = built
    openlm = to_openlm_names(full, run.model)
    lm = {k: v for k, v in full.items() if not k.startswith("projector.")}
    back = from_openlm_names(openlm, run.model)
    assert back.keys() == lm.keys()
    for k in lm:
        assert torch.equal(back[k], lm[k]), k
    assert set(openlm) == set(ReferenceDCLM(run.model).state_dict())
    # q of head 1 in OpenLM's block layout is rows hd..2hd of megatron's per-head group 1
    hd, d = run.model.head_dim, run.model.hidden_size
    qkv = full["decoder.layers.0.self_attention.linear_qkv.weight"]
    in_proj = openlm["layers.0.attention.in_proj.weight"]
    assert torch.equal(in_proj[hd:2 * hd], qkv[3 * hd:4 * hd])          # q, head 1
    assert torch.equal(in_proj[d + hd:d + 2 * hd], qkv[4 * hd:5 * hd])  # k, head 1
    assert torch.equal(qkv_megatron_to_openlm(qkv, run.model.num_attention_heads), in_proj)
    with pytest.raises(KeyError, match="missing"):
        to_openlm_names({k: v for k, v in full.items() if "layers.1.mlp" not in k}, run.model)
    with pytest.raises(KeyError, match="no OpenLM name"):
        to_openlm_names(dict(full, **{"decoder.layers.0.self_attention.linear_qkv.bias": qkv[:, 0]}),
                        run.model)


def test_reference_trains(built):
    """The reference is an ordinary trainable module (the benchmark's plain-PyTorch model)."""
    run, _, full = built
    ref = reference_from_megatron(full, run.model)
    tokens = torch.randint(0, run.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    loss = F.cross_entropy(ref(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ref.parameters())
    assert math.isfinite(loss.item())


def test_document_mask_is_causal_within_documents():
    """A document starts where the position id restarts at 0; no attention across documents."""
    pos = torch.tensor([[0, 1, 2, 0, 1]])
    allowed = ~document_mask(document_bounds(pos), *pos.shape)[0, 0]
    want = torch.tensor([[1, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0],
                         [1, 1, 1, 0, 0],
                         [0, 0, 0, 1, 0],
                         [0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(allowed, want)
