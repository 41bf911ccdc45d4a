"""collate builds the Batch contract: image first then SEP then text, no image position ever in
the loss, documents packed without predicting across boundaries, position ids restarting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megavlm.data.batch import Batch, Sample, collate, image_head
from megavlm.data.tokenizer import SENTENCEPIECE_IDS as IDS
from megavlm.ops.masked_ce import masked_cross_entropy_reference

PAD, EOD, SEP, IMG = IDS.pad, IDS.eod, IDS.sep, IDS.image
P, W = 4, 6


def caption(n: int, seed: int) -> Sample:
    g = np.random.default_rng(seed)
    cap = g.integers(10, 50, size=n)
    tok = np.concatenate([image_head(IDS, P), cap, [EOD]])
    tgt = np.concatenate([np.zeros(P + 1, bool), np.ones(n + 1, bool)])
    img = g.standard_normal((P, W)).astype(np.float32).astype(np.float16).view(np.uint16)
    return Sample(tok, tgt, image=img, image_start=0, source="captions")


def text(n: int, seed: int) -> Sample:
    return Sample(np.random.default_rng(seed).integers(10, 50, size=n), np.ones(n, bool))


def test_image_head_is_placeholders_then_sep(tok):
    head = image_head(IDS, 3)
    assert head.dtype == np.int64 and head.tolist() == [IMG, IMG, IMG, SEP]
    assert image_head(tok, 2).tolist() == [tok.image, tok.image, tok.sep]  # a Tokenizer works too
    with pytest.raises(ValueError, match="num_patches=0"):
        image_head(IDS, 0)


def test_caption_row_layout_and_masks():
    b = collate([[caption(5, 0), text(5, 1)], [text(16, 2)]], 16, PAD, embed_dtype=torch.float16)
    assert b.tokens.shape == (2, 16)
    img_pos = b.image_position_mask(P)
    assert img_pos[0, :P].all() and not img_pos[0, P:].any() and not img_pos[1].any()
    assert b.tokens[0, P] == SEP
    # SEP predicts the first caption token; no image position is trained, nothing predicts IMG
    assert b.loss_mask[0, P] == 1 and b.labels[0, P] == b.tokens[0, P + 1]
    assert (b.loss_mask[img_pos] == 0).all()
    assert (b.loss_mask[b.labels == IMG] == 0).all()
    # the caption's EOD (last token of the first document) predicts nothing across the boundary
    end = P + 1 + 5 + 1
    assert b.tokens[0, end - 1] == EOD and b.loss_mask[0, end - 1] == 0
    assert b.position_ids[0, end].item() == 0 and b.position_ids[0, end + 1].item() == 1
    assert b.cu_seqlens.tolist() == [0, end, 16, 32]
    assert b.image_embeds.dtype == torch.float16 and b.image_embeds.shape == (1, P, W)
    assert b.image_slots.tolist() == [[0, 0]]


def test_unpacked_rows_have_no_boundaries_and_overflow_is_an_error():
    b = collate([[text(8, 0)], [text(8, 1)]], 8, PAD)
    assert b.cu_seqlens is None and b.image_embeds is None
    with pytest.raises(ValueError, match="does not fit"):
        collate([[text(6, 0), text(6, 1)]], 8, PAD)


def test_image_positions_get_no_gradient():
    b = collate([[caption(7, 3)], [caption(3, 4), text(4, 5)]], 16, PAD, embed_dtype=torch.float16)
    hidden = torch.randn(2, 16, 8, requires_grad=True)
    weight = torch.randn(60, 8)
    loss, count = masked_cross_entropy_reference(hidden, weight, b.labels, b.loss_mask)
    loss.backward()
    img_pos = b.image_position_mask(P)
    assert count.item() == int(b.loss_mask.sum())
    assert hidden.grad[img_pos].abs().sum() == 0
    assert hidden.grad[b.loss_mask.bool()].abs().sum(-1).min() > 0
    # labels at untrained positions cannot change the loss
    labels = b.labels.clone()
    labels[b.loss_mask == 0] = 59
    again, _ = masked_cross_entropy_reference(hidden, weight, labels, b.loss_mask)
    assert again.item() == loss.item()


def test_batch_validates_shapes():
    t = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="labels has shape"):
        Batch(tokens=t, labels=torch.zeros(2, 3, dtype=torch.long), loss_mask=t.float(), position_ids=t)
