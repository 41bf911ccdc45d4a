"""KV-cache generation equals generation without a cache, token for token.

The reference is ``CheckpointModel.generate(cache=False)``: every step re-runs each row's whole
sequence (right-padded, causal). The cached path runs the prompts once and then one token per
row over megavlm.model.attention.KVCache. Compared on the tiny trained checkpoint of
tests/eval/conftest.py: text rows, image rows, batches mixing prompt lengths (and text with image
rows), batch size 1, stop strings, rows that reach the model's sequence length — and at TP = 2
over gloo against one process. The cache's own pieces are checked against full causal attention.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from megavlm.eval.runner import CheckpointModel
from megavlm.model.attention import KVCache, KVCacheError, SDPAttention, cache_seats
from tests.dist import ROOT, free_port

HERE = os.path.dirname(__file__)


def _prompts(model: CheckpointModel, lengths: list[int], seed: int = 0) -> list[list[int]]:
    """Prompts of the given lengths from the tokenizer's ordinary ids (real text, then cut)."""
    text = ("the cat runs near the river and the small dog sleeps under the old tree while "
            "two blue birds eat in the house what is shown in the image answer yes or no ") * 4
    ids = model.encode(text)
    return [ids[seed + i:seed + i + n] for i, n in enumerate(lengths)]


def _images(n: int, model: CheckpointModel, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(model.num_patches, model.run.model.vision.embed_dim, generator=g) for _ in range(n)]


def _both(model: CheckpointModel, prompts, images=None, **kw):
    ref = model.generate_ids(prompts, images, cache=False, **kw)
    got = model.generate_ids(prompts, images, cache=True, **kw)
    return ref, got


def test_text_rows_of_mixed_lengths(loaded):
    prompts = _prompts(loaded, [3, 17, 1, 9, 30, 5])  # batch size 4: two batches, both mixed
    ref, got = _both(loaded, prompts, max_new_tokens=12)
    assert got == ref
    assert sum(map(len, ref)) > 12  # rows really generated (not all stopped at once)
    assert loaded.generate(prompts, max_new_tokens=12) == loaded.generate(prompts, max_new_tokens=12, cache=False)


def test_image_rows_and_mixed_batches(loaded):
    prompts = _prompts(loaded, [2, 11, 6, 20, 4], seed=3)
    imgs = _images(5, loaded)
    ref, got = _both(loaded, prompts, imgs, max_new_tokens=10)
    assert got == ref
    mixed = [imgs[0], None, imgs[2], None, imgs[4]]  # image rows beside text rows, lengths differ
    ref_m, got_m = _both(loaded, prompts, mixed, max_new_tokens=10)
    assert got_m == ref_m
    assert ref_m != ref  # the images are read (rows 0, 2, 4 keep theirs; 1, 3 lost theirs)


def test_batch_size_one_and_empty_prompt(loaded):
    prompts = _prompts(loaded, [7, 1, 14], seed=5) + [[]]
    imgs = _images(4, loaded, seed=1)
    images = [imgs[0], None, None, imgs[3]]
    bs = loaded.batch_size
    try:
        loaded.batch_size = 1
        ref1, got1 = _both(loaded, prompts, images, max_new_tokens=9)
    finally:
        loaded.batch_size = bs
    assert got1 == ref1
    # batching does not change what a row generates (the right padding is never attended)
    assert loaded.generate_ids(prompts, images, max_new_tokens=9) == got1


def test_stop_strings_and_stop_ids(loaded):
    prompts = _prompts(loaded, [5, 12, 3, 8], seed=2)
    free = loaded.generate_ids(prompts, max_new_tokens=10, cache=False)
    row = max(range(len(free)), key=lambda i: len(free[i]))
    assert len(free[row]) >= 4
    piece = loaded.tok.decode(free[row][2:4]).strip() or loaded.tok.decode(free[row][2:4])
    ref, got = _both(loaded, prompts, max_new_tokens=10, stop_strings=[piece])
    assert got == ref
    assert len(got[row]) < len(free[row])  # the stop string cut the row short
    assert piece not in loaded.generate(prompts, max_new_tokens=10, stop_strings=[piece])[row]
    stop_id = free[row][1]
    ref, got = _both(loaded, prompts, max_new_tokens=10, stop_ids=[stop_id])
    assert got == ref and len(got[row]) == 1 and stop_id not in got[row]


def test_rows_reaching_the_sequence_length(loaded):
    L = loaded.max_length
    prompts = _prompts(loaded, [L - 3, L - 8, 4, L + 10], seed=1)  # the last one is cut to L - 1
    ref, got = _both(loaded, prompts, max_new_tokens=20)
    assert got == ref
    for p, new in zip(prompts, got):
        assert min(len(p), L - 1) + len(new) <= L
    assert any(min(len(p), L - 1) + len(new) == L for p, new in zip(prompts, got))  # the length stopped one


def test_decode_step_equals_full_causal_attention(parallel1):
    """One SDPAttention: prompt + decode steps through the cache equal causal attention over the
    whole sequence at each new position, for right-padded rows of different lengths."""
    from tests.model.test_attention import _config

    cfg = _config()
    att = SDPAttention(cfg, 1, AttnMaskType.causal)
    H, D = cfg.num_attention_heads, cfg.kv_channels
    g = torch.Generator().manual_seed(0)
    lengths, steps = [5, 2, 7], 4
    full = [torch.randn(n + steps, H, D, generator=g) for n in lengths for _ in range(3)]
    q_rows, k_rows, v_rows = full[0::3], full[1::3], full[2::3]
    S = max(lengths)

    def pad(rows, n):
        out = torch.zeros(n, len(rows), H, D)
        for b, r in enumerate(rows):
            out[:min(n, len(r)), b] = r[:n]
        return out

    kv = KVCache(S + steps)
    kv.prefill(lengths, "cpu")
    with kv.attached([att]):
        out = att(pad([r[:n] for r, n in zip(q_rows, lengths)], S),
                  pad([r[:n] for r, n in zip(k_rows, lengths)], S),
                  pad([r[:n] for r, n in zip(v_rows, lengths)], S), None)
    for b, n in enumerate(lengths):
        want = att(q_rows[b][:n, None], k_rows[b][:n, None], v_rows[b][:n, None], None)[:, 0]
        torch.testing.assert_close(out[:n, b], want, rtol=1e-5, atol=1e-6)
    for t in range(steps):
        pos = kv.decode()[:, 0].tolist()
        assert pos == [n + t for n in lengths]
        one = [torch.stack([r[p] for r, p in zip(rows, pos)])[None] for rows in (q_rows, k_rows, v_rows)]
        with kv.attached([att]):
            out = att(*one, None)  # [1, B, H*D]
        for b, p in enumerate(pos):
            want = att(q_rows[b][:p + 1, None], k_rows[b][:p + 1, None], v_rows[b][:p + 1, None], None)
            torch.testing.assert_close(out[0, b], want[-1, 0], rtol=1e-5, atol=1e-6)
    kv.keep([2, 0])
    assert kv.lengths.tolist() == [7 + steps, 5 + steps]


def test_cache_refuses_misuse(parallel1):
    from tests.model.test_attention import _config

    cfg = _config()
    att = SDPAttention(cfg, 1, AttnMaskType.causal)
    H, D = cfg.num_attention_heads, cfg.kv_channels
    x = torch.randn(4, 2, H, D)
    kv = KVCache(6)
    with pytest.raises(KVCacheError, match="before prefill"):
        kv.decode()
    with pytest.raises(KVCacheError, match=r"lengths must be in \[1, 6\]"):
        kv.prefill([3, 7], "cpu")
    kv = KVCache(6)
    kv.prefill([4, 2], "cpu")
    with kv.attached([att]):
        att(x, x, x, None)
        with pytest.raises(KVCacheError, match="call decode"):
            att(x, x, x, None)  # a second forward without decode()
    assert att.kv_cache is None  # detached after the forward, also after an error
    kv.decode()
    with kv.attached([att]), pytest.raises(KVCacheError, match="one token per row"):
        att(x, x, x, None)
    kv.decode()  # the longest row now fills all 6 positions
    with pytest.raises(KVCacheError, match="KV cache full"):
        kv.decode()


def test_other_attention_falls_back_with_a_logged_reason(loaded, caplog):
    """A model whose attention seat is not SDPAttention (here megatron's own DotProductAttention,
    as with a foreign spec; TE's attention is refused the same way) generates without the cache
    and says so — never a wrong cached result."""
    layer = loaded.model.decoder.layers[0]
    mine = layer.self_attention.core_attention
    other = DotProductAttention(loaded.model.config, mine.layer_number, AttnMaskType.causal, "self")
    prompts = _prompts(loaded, [4, 9])
    want = loaded.generate_ids(prompts, max_new_tokens=6, cache=False)
    other_model = CheckpointModel([loaded.model], loaded.run, loaded.tok, loaded.path, batch_size=4)
    try:
        layer.self_attention.core_attention = other
        with pytest.raises(KVCacheError, match="DotProductAttention"):
            cache_seats(loaded.model.decoder)
        with caplog.at_level(logging.WARNING, logger="megavlm.eval.runner"):
            got = other_model.generate_ids(prompts, max_new_tokens=6)
    finally:
        layer.self_attention.core_attention = mine
    assert "without a KV cache" in caplog.text and "DotProductAttention" in caplog.text
    assert got == want


def tp_case(model: CheckpointModel) -> dict:
    """The prompts the TP = 2 worker generates from (also run in one process by the test)."""
    prompts = _prompts(model, [6, 1, 13, 3], seed=4)
    images = _images(4, model, seed=2)
    return {"prompts": prompts, "images": [images[0], None, images[2], None], "max_new_tokens": 8}


@pytest.mark.distributed
def test_tensor_parallel_two_ranks_equal_one_process(loaded, tiny_checkpoint, tmp_path):
    case = tp_case(loaded)
    one = loaded.generate_ids(case["prompts"], case["images"], max_new_tokens=case["max_new_tokens"])
    assert one == loaded.generate_ids(case["prompts"], case["images"], max_new_tokens=case["max_new_tokens"],
                                      cache=False)
    out = tmp_path / "tp2.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "--master_addr=127.0.0.1", os.path.join(HERE, "kv_tp_worker.py"), str(tiny_checkpoint), str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    res = json.loads(out.read_text())
    assert res["tp"] == 2 and res["heads_per_rank"] == loaded.run.model.num_attention_heads // 2
    assert res["cached"] == res["uncached"]
    assert res["cached"] == one
