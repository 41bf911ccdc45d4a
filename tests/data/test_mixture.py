"""Mixing and packing: exact ratios, determinism, dp disjointness, resume, epochs, and that a
packed row trains every document exactly as it would be trained alone."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megavlm.config import DataConfig, MixtureConfig, VisionConfig
from megavlm.data.batch import collate
from megavlm.data.indexed import DataError
from megavlm.data.mixture import CAPTIONS, INSTRUCTIONS, TEXT, LoaderSpec, MixturePlanner
from megavlm.train.plan import build_loader

P, D = 4, 8
VISION = VisionConfig(embed_dim=D, num_patches=P)


def make_loader(root, text=0.5, captions=0.3, instructions=0.2, *, seq=64, mbs=2, nmb=3, dp_rank=0,
                dp_size=1, seed=7, stage="s", epochs=None, too_long="truncate"):
    data = DataConfig(root=str(root), instructions=["instructions"], too_long=too_long)
    spec = LoaderSpec(stage=stage, data=data, vision=VISION, seq_length=seq, seed=seed, epochs=epochs,
                      mixture=MixtureConfig(text=text, captions=captions, instructions=instructions))
    return build_loader(spec, micro_batch_size=mbs, num_microbatches=nmb, dp_rank=dp_rank, dp_size=dp_size)


def same(a, b) -> bool:
    for f in ("tokens", "labels", "loss_mask", "position_ids", "image_embeds", "image_slots", "cu_seqlens"):
        x, y = getattr(a, f), getattr(b, f)
        if (x is None) != (y is None):
            return False
        if x is not None and (x.shape != y.shape or not torch.equal(x.view(torch.uint8) if x.dtype == torch.bfloat16
                                                                     else x, y.view(torch.uint8)
                                                                     if y.dtype == torch.bfloat16 else y)):
            return False
    return True


def test_batches_follow_the_contract(corpus):
    ld = make_loader(corpus)
    tok = ld.tokenizer
    batches = ld.next_step()
    assert len(batches) == 3
    n_images = 0
    for b in batches:
        assert b.tokens.shape == (2, 64)
        img = b.image_position_mask(P)
        assert (b.tokens[img] == tok.image).all()
        assert (b.tokens[~img] != tok.image).all()
        assert (b.loss_mask[img] == 0).all()
        assert not ((b.labels == tok.image) & (b.loss_mask > 0)).any(), "an image position is predicted"
        if b.image_slots is not None:
            n_images += len(b.image_slots)
            assert b.image_embeds.dtype == torch.bfloat16 and b.image_embeds.shape[1:] == (P, D)
            for r, s in b.image_slots.tolist():  # SEP right after the image, then caption/turns
                assert b.tokens[r, s + P] == tok.sep
                assert b.position_ids[r, s] == 0
        cu = b.cu_seqlens
        assert cu is not None and cu[0] == 0 and cu[-1] == 2 * 64 and (cu[1:] > cu[:-1]).all()
        assert set(range(0, 2 * 64 + 1, 64)) <= set(cu.tolist()), "row ends must be boundaries"
        flat = b.position_ids.reshape(-1)
        for lo, hi in zip(cu[:-1].tolist(), cu[1:].tolist()):
            assert flat[lo:hi].tolist() == list(range(hi - lo))
    assert n_images > 0
    s = ld.last_stats
    assert s["text_positions"] + s["caption_positions"] + s["instruction_positions"] + s["pad_positions"] == 6 * 64


def test_same_seed_same_batches_and_seed_matters(corpus):
    a, b, c = make_loader(corpus), make_loader(corpus), make_loader(corpus, seed=8)
    for _ in range(3):
        xa, xb, xc = a.next_step(), b.next_step(), c.next_step()
        assert all(same(p, q) for p, q in zip(xa, xb))
    assert not all(same(p, q) for p, q in zip(xa, xc))


def test_dp_ranks_split_the_global_batch(corpus):
    one = make_loader(corpus, nmb=4)
    ranks = [make_loader(corpus, nmb=2, dp_rank=r, dp_size=2) for r in range(2)]
    for _ in range(2):
        full = torch.cat([b.tokens for b in one.next_step()])
        parts = torch.cat([b.tokens for r in ranks for b in r.next_step()])
        assert torch.equal(full, parts)
        r0 = {tuple(x.tolist()) for b in ranks[0].next_step() for x in b.tokens}
        r1 = {tuple(x.tolist()) for b in ranks[1].next_step() for x in b.tokens}
        assert not (r0 & r1), "ranks got the same row"
        one.next_step()


def test_resume_continues_the_same_sequence(corpus):
    ref = make_loader(corpus)
    for _ in range(3):
        ref.next_step()
    state = json.loads(json.dumps(ref.state_dict()))
    expect = [ref.next_step() for _ in range(4)]
    again = make_loader(corpus)
    again.load_state_dict(state)
    got = [again.next_step() for _ in range(4)]
    assert all(same(p, q) for e, g in zip(expect, got) for p, q in zip(e, g))


def test_resume_refuses_a_different_loader(corpus):
    ref = make_loader(corpus)
    ref.next_step()
    with pytest.raises(DataError, match="seed"):
        make_loader(corpus, seed=99).load_state_dict(ref.state_dict())
    with pytest.raises(DataError, match="seq_length"):
        make_loader(corpus, seq=128).load_state_dict(ref.state_dict())
    with pytest.raises(DataError, match="rows per step"):
        make_loader(corpus, mbs=4).load_state_dict(ref.state_dict())


def test_loader_ratio_over_windows(corpus):
    ld = make_loader(corpus, text=0.6, captions=0.25, instructions=0.15, seq=64, mbs=10, nmb=10)
    rows = []
    for _ in range(15):
        ld.next_step()
        s = ld.last_stats
        rows.append((s["text_positions"], s["caption_positions"], s["instruction_positions"]))
    c = np.cumsum(np.array(rows, dtype=float), 0)
    w = c[10:] - np.vstack([np.zeros(3), c[:-11]])  # windows of 1,000 rows
    frac = w / w.sum(1, keepdims=True)
    assert np.abs(frac - [0.6, 0.25, 0.15]).max() < 0.005


def test_epochs_visit_every_conversation_once(corpus):
    ld = make_loader(corpus, text=0, captions=0, instructions=1.0, seq=64, mbs=1, nmb=1, epochs=2)
    rows = ld.tokens_per_epoch // 64
    assert rows > 0
    seen = []
    for _ in range(rows):
        seen += [i for k, i, _, _ in ld.planner.plan_row() if k == INSTRUCTIONS]
    n = len(ld.sources[INSTRUCTIONS])
    assert sorted(seen) == list(range(n))


def test_missing_dataset_and_too_long(corpus):
    data = DataConfig(root=str(corpus), instructions=[])
    with pytest.raises(DataError, match="data.instructions lists no dataset"):
        build_loader(LoaderSpec(stage="s", data=data, mixture=MixtureConfig(text=0.5, instructions=0.5),
                                vision=VISION, seq_length=64, seed=0))
    with pytest.raises(DataError, match=r"captions.bin: record \d+ is \d+ positions"):
        make_loader(corpus, seq=12, too_long="reject")
    ld = make_loader(corpus, seq=12)
    assert ld.truncated["captions"] > 0
    b = ld.next_step()[0]
    assert b.tokens.shape == (2, 12)


def test_wrong_vision_config_is_refused(corpus):
    data = DataConfig(root=str(corpus), instructions=["instructions"])
    with pytest.raises(DataError, match="embed_dim=16"):
        build_loader(LoaderSpec(stage="s", data=data, mixture=MixtureConfig(text=0.5, captions=0.5),
                                vision=VisionConfig(embed_dim=16, num_patches=P), seq_length=64, seed=0))


# ---------------------------------------------------------------------------------------------
# property test on the planner: ratios over any 1,000 rows, packing invariants


@st.composite
def mixtures(draw):
    w = [draw(st.integers(0, 10)) for _ in range(3)]
    if w[TEXT] == 0 and w[CAPTIONS] == 0 and w[INSTRUCTIONS] == 0:
        w[TEXT] = 1
    f = [x / sum(w) for x in w]
    S = draw(st.sampled_from([64, 256, 2048]))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    text = rng.integers(1, 3 * S, draw(st.integers(1, 300)))
    lo = draw(st.integers(2, S // 2))
    caps = rng.integers(lo, draw(st.integers(lo, S)) + 1, draw(st.integers(1, 200)))
    inst = rng.integers(2, S + 1, draw(st.integers(1, 200)))
    return f, S, seed, [text, caps, inst]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mixtures())
def test_planner_holds_ratios_and_packs_validly(m):
    f, S, seed, lengths = m
    p = MixturePlanner(lengths, f, seq_length=S, seed=seed, stage="prop")
    rows = []
    text_stream = []
    for _ in range(1300):
        plan = p.plan_row()
        c = [0, 0, 0]
        for k, i, off, n in plan:
            assert n > 0
            if k == TEXT:
                assert 0 <= off and off + n <= lengths[TEXT][i]
                text_stream.append((i, off, n))
            else:
                assert off == 0 and n == lengths[k][i]
            c[k] += n
        assert sum(c) <= S
        rows.append(c)
    R = np.array(rows, dtype=float)
    cs = np.vstack([np.zeros(3), np.cumsum(R, 0)])
    win = cs[1000:] - cs[:-1000]
    frac = win / win.sum(1, keepdims=True)
    assert np.abs(frac - np.array(f)).max() <= 0.005, (f, S)
    # the text stream is read contiguously: each piece starts where the previous one ended
    for (i0, o0, n0), (i1, o1, n1) in zip(text_stream, text_stream[1:]):
        if o1 > 0:
            assert i1 == i0 and o1 == o0 + n0


# ---------------------------------------------------------------------------------------------
# packing: per-document losses of a packed row equal those of the documents alone


class TinyLM(torch.nn.Module):
    """Embedding + learned positions + one causal attention layer that respects cu_seqlens
    (block-diagonal mask) + image projector splicing embeddings into their slots."""

    def __init__(self, vocab: int, d: int = 16, max_pos: int = 256):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Parameter(torch.randn(vocab, d, generator=g) * 0.5)
        self.pos = torch.nn.Parameter(torch.randn(max_pos, d, generator=g) * 0.5)
        self.qkv = torch.nn.Parameter(torch.randn(d, 3 * d, generator=g) / d ** 0.5)
        self.proj = torch.nn.Parameter(torch.randn(D, d, generator=g) / D ** 0.5)
        self.out = torch.nn.Parameter(torch.randn(d, vocab, generator=g) / d ** 0.5)

    def forward(self, b) -> torch.Tensor:
        B, S = b.tokens.shape
        x = self.emb[b.tokens] + self.pos[b.position_ids]
        if b.image_slots is not None:
            x = x.clone()
            for (r, s), e in zip(b.image_slots.tolist(), b.image_embeds.float()):
                x[r, s:s + P] = e @ self.proj + self.pos[b.position_ids[r, s:s + P]]
        x = x.reshape(B * S, -1)
        doc = torch.zeros(B * S, dtype=torch.long)
        cu = b.cu_seqlens if b.cu_seqlens is not None else torch.arange(0, B * S + 1, S)
        for j, (lo, hi) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            doc[lo:hi] = j
        idx = torch.arange(B * S)
        mask = (doc[:, None] == doc[None, :]) & (idx[:, None] >= idx[None, :])
        q, k, v = (x @ self.qkv).chunk(3, dim=-1)
        att = (q @ k.T / q.shape[-1] ** 0.5).masked_fill(~mask, float("-inf")).softmax(-1)
        h = x + att @ v
        logits = (h @ self.out).reshape(B, S, -1)
        ce = torch.nn.functional.cross_entropy(logits.reshape(B * S, -1), b.labels.reshape(-1),
                                               reduction="none").reshape(B, S)
        return ce * b.loss_mask


def test_packed_row_equals_documents_alone(corpus):
    ld = make_loader(corpus, text=0.5, captions=0.3, instructions=0.2, seq=96, mbs=1, nmb=1)
    model = TinyLM(ld.tokenizer.vocab_size)
    checked = 0
    for _ in range(6):
        plan = ld.planner.plan_row()
        samples = ld._materialize(plan, dict.fromkeys(
            ("text_positions", "caption_positions", "instruction_positions", "image_sample_positions",
             "patch_positions"), 0))
        packed = model(collate([samples], 96, ld.tokenizer.pad))[0]
        off = 0
        for s in samples:
            n = len(s.tokens)
            alone = model(collate([[s]], 96, ld.tokenizer.pad))[0]
            torch.testing.assert_close(packed[off:off + n], alone[:n], rtol=1e-5, atol=1e-6)
            assert alone[n:].abs().sum() == 0
            off += n
            checked += 1
        assert packed[off:].abs().sum() == 0
    assert checked > 10
