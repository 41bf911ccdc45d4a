"""SDPAttention (the local spec's core attention) equals megatron-core's DotProductAttention with
the dense document mask, forward and backward, in fp32 to 1e-5 — for rows with one, several and
many documents, documents of length 1, rows ending in padding, image-caption rows and unpacked
rows — and refuses what it cannot do. The boundary builder checks what it is given.

The reference is megatron's own DotProductAttention fed megavlm.model.reference.document_mask
([B, 1, S, S]) on the [S, B, heads, D] layout; SDPAttention gets the same numbers flattened to
the thd layout [B·S, heads, D] with megavlm.model.attention.document_boundaries, as in training.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from megavlm.config import ModelConfig, ParallelConfig
from megavlm.model.attention import (BoundaryError, SDPAttention, check_boundaries,
                                     document_boundaries, for_device_kernels, host_boundaries)
from megavlm.model.reference import document_mask
from megavlm.model.specs import transformer_config

TOL = 1e-5
HEADS, HD = 4, 16


def _config():
    model = ModelConfig(hidden_size=HEADS * HD, num_attention_heads=HEADS, ffn_hidden_size=96)
    return transformer_config(model, ParallelConfig(), dtype=torch.float32, batch_p2p_comm=False)


def _rows(lengths_per_row: list[list[int]], S: int) -> torch.Tensor:
    """cu_seqlens over flattened rows; a row shorter than S ends in a padding document."""
    b = [0]
    for r, lengths in enumerate(lengths_per_row):
        for n in lengths:
            b.append(b[-1] + n)
        assert b[-1] <= (r + 1) * S
        if b[-1] < (r + 1) * S:
            b.append((r + 1) * S)
    return torch.tensor(b, dtype=torch.int32)


CASES = {
    "one_document": ([[32], [32]], 32),
    "several": ([[5, 11, 16], [20, 12]], 32),
    "many": ([[1, 2, 3, 4, 5, 6, 7, 4], [3] * 10 + [2]], 32),
    "length_one_documents": ([[1] * 16, [1, 1, 14]], 16),
    "padding_at_row_end": ([[7, 9], [3], []], 24),
    "equal_lengths_apart": ([[8, 5, 8, 3], [8, 8]], 24),  # one length group, not contiguous
}


def _qkv(B, S, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(S, B, HEADS, HD, generator=g, requires_grad=True) for _ in range(3)]


def _compare(out_ref, out_new, inputs_ref, inputs_new, seed):
    g = torch.Generator().manual_seed(seed + 1)
    upstream = torch.randn(out_ref.shape, generator=g)
    (out_ref * upstream).sum().backward()
    (out_new * upstream.reshape(out_new.shape)).sum().backward()
    assert (out_ref - out_new.reshape(out_ref.shape)).abs().max().item() <= TOL
    for name, a, b in zip("qkv", inputs_ref, inputs_new):
        d = (a.grad - b.grad).abs().max().item()
        assert d <= TOL, f"d{name} differs by {d}"
        assert a.grad.abs().max() > 0


@pytest.mark.parametrize("case", sorted(CASES))
def test_packed_rows_equal_dense_mask_forward_and_backward(parallel1, case):
    lengths, S = CASES[case]
    B = len(lengths)
    cu = _rows(lengths, S)
    cfg = _config()
    ref = DotProductAttention(cfg, 1, AttnMaskType.causal, "self")
    new = SDPAttention(cfg, 1, AttnMaskType.causal, "self")
    q, k, v = _qkv(B, S, seed=len(case))
    out_ref = ref(q, k, v, document_mask(cu, B, S), attn_mask_type=AttnMaskType.causal)  # [S, B, h]
    # the same tensors in the training layout: rows flattened to [B*S, heads, D]
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    thd = [t.transpose(0, 1).reshape(B * S, HEADS, HD) for t in leaves]
    params = document_boundaries(cu, B * S, "cpu", row_length=S)
    out_new = new(*thd, None, attn_mask_type=AttnMaskType.causal, packed_seq_params=params)
    assert out_new.shape == (B * S, HEADS * HD)
    out_new = out_new.view(B, S, -1).transpose(0, 1)
    _compare(out_ref, out_new, (q, k, v), leaves, seed=len(case))


def test_unpacked_rows_equal_megatron_causal(parallel1):
    cfg = _config()
    ref = DotProductAttention(cfg, 1, AttnMaskType.causal, "self")
    new = SDPAttention(cfg, 1, AttnMaskType.causal, "self")
    q, k, v = _qkv(3, 40, seed=9)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out_ref = ref(q, k, v, None, attn_mask_type=AttnMaskType.causal)
    out_new = new(*leaves, None, attn_mask_type=AttnMaskType.causal)
    assert out_new.shape == out_ref.shape == (40, 3, HEADS * HD)
    _compare(out_ref, out_new, (q, k, v), leaves, seed=9)


def test_image_caption_rows_from_collate(parallel1):
    """Boundaries as the data pipeline makes them (caption rows end in padding, packed text)."""
    from megavlm.data.batch import collate
    from tests import synthetic

    S = 32
    batch = collate(synthetic.global_rows(3, 0, 3, S, 4, 8, images=True), S, synthetic.PAD, embed_dtype=None)
    assert batch.image_slots is not None and batch.cu_seqlens is not None
    B = batch.tokens.shape[0]
    cfg = _config()
    ref = DotProductAttention(cfg, 1, AttnMaskType.causal, "self")
    new = SDPAttention(cfg, 1, AttnMaskType.causal, "self")
    q, k, v = _qkv(B, S, seed=3)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out_ref = ref(q, k, v, document_mask(batch.cu_seqlens, B, S), attn_mask_type=AttnMaskType.causal)
    thd = [t.transpose(0, 1).reshape(B * S, HEADS, HD) for t in leaves]
    params = document_boundaries(batch.cu_seqlens, B * S, "cpu", row_length=S)
    out_new = new(*thd, None, attn_mask_type=AttnMaskType.causal, packed_seq_params=params)
    _compare(out_ref, out_new.view(B, S, -1).transpose(0, 1), (q, k, v), leaves, seed=3)


def test_cross_document_leak_is_visible(parallel1):
    """The comparison can fail: attention over the row as one document differs from the
    per-document reference far beyond the tolerance."""
    lengths, S = CASES["several"]
    B = len(lengths)
    cfg = _config()
    ref = DotProductAttention(cfg, 1, AttnMaskType.causal, "self")
    new = SDPAttention(cfg, 1, AttnMaskType.causal, "self")
    q, k, v = _qkv(B, S, seed=1)
    with torch.no_grad():
        want = ref(q, k, v, document_mask(_rows(lengths, S), B, S), attn_mask_type=AttnMaskType.causal)
        rows_only = document_boundaries(torch.arange(0, B * S + 1, S), B * S, "cpu")
        thd = [t.transpose(0, 1).reshape(B * S, HEADS, HD) for t in (q, k, v)]
        got = new(*thd, None, attn_mask_type=AttnMaskType.causal, packed_seq_params=rows_only)
    assert (got.view(B, S, -1).transpose(0, 1) - want).abs().max() > 100 * TOL


def test_boundaries_are_checked():
    with pytest.raises(BoundaryError, match="ends at 30, but the rows hold 32 positions"):
        check_boundaries(torch.tensor([0, 10, 30]), 32)
    with pytest.raises(BoundaryError, match="start at 0"):
        check_boundaries(torch.tensor([2, 32]), 32)
    with pytest.raises(BoundaryError, match="increase strictly: entry 2 is 10 after 10"):
        check_boundaries(torch.tensor([0, 10, 10, 32]), 32)
    with pytest.raises(BoundaryError, match="end of row 0 .position 16.: a document would run "
                                            "across rows of seq_length 16"):
        check_boundaries(torch.tensor([0, 10, 20, 32]), 32, row_length=16)
    assert check_boundaries(torch.tensor([0, 10, 16, 32]), 32, row_length=16) == [0, 10, 16, 32]


def test_document_boundaries_keep_a_host_copy():
    p = document_boundaries(torch.tensor([0, 3, 8, 16], dtype=torch.int64), 16, "meta")
    assert p.qkv_format == "thd" and p.max_seqlen_q == p.max_seqlen_kv == 8
    assert p.cu_seqlens_q.device.type == "meta" and p.cu_seqlens_q.dtype == torch.int32
    assert p.cu_seqlens_q_padded.device.type == "cpu"
    assert host_boundaries(p) == [0, 3, 8, 16]
    te = for_device_kernels(p)
    assert te.cu_seqlens_q_padded is None and te.cu_seqlens_kv_padded is None
    assert te.cu_seqlens_q is p.cu_seqlens_q and te.max_seqlen_q == 8


def test_refuses_masks_and_what_it_does_not_implement(parallel1):
    cfg = _config()
    att = SDPAttention(cfg, 1, AttnMaskType.causal, "self")
    q = torch.randn(8, 1, HEADS, HD)
    with pytest.raises(ValueError, match="not a dense attention mask"):
        att(q, q, q, torch.zeros(1, 1, 8, 8, dtype=torch.bool))
    p = document_boundaries(torch.tensor([0, 4, 8]), 8, "cpu")
    with pytest.raises(BoundaryError, match="ends at 8 but the sequence has 6"):
        att(q[:6, 0], q[:6, 0], q[:6, 0], None, packed_seq_params=p)
    cfg.attention_dropout = 0.1
    with pytest.raises(ValueError, match="no attention dropout"):
        SDPAttention(cfg, 1, AttnMaskType.causal, "self")
    cfg = dataclasses.replace(_config())
    with pytest.raises(ValueError, match="self-attention only"):
        SDPAttention(cfg, 1, AttnMaskType.causal, "cross")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_paths_equal_grouped_sdpa(parallel1, dtype):
    """On CUDA: varlen flash attention (16-bit) and the grouped SDPA path give the same outputs
    and gradients as the fp32 CPU computation, to the dtype's rounding."""
    lengths, S = CASES["many"]
    B = len(lengths)
    cu = _rows(lengths, S)
    cfg = _config()
    att = SDPAttention(cfg, 1, AttnMaskType.causal, "self")
    q, k, v = _qkv(B, S, seed=5)
    thd = [t.detach().transpose(0, 1).reshape(B * S, HEADS, HD) for t in (q, k, v)]
    cpu_leaves = [t.clone().requires_grad_() for t in thd]
    want = att(*cpu_leaves, None, packed_seq_params=document_boundaries(cu, B * S, "cpu"))
    want.square().sum().backward()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for varlen in (True, False):
        # 16-bit: the varlen kernel must really run (an error naming why, never a quiet fallback)
        att.use_varlen = ("require" if dtype == torch.bfloat16 else True) if varlen else False
        leaves = [t.cuda().to(dtype).requires_grad_() for t in thd]
        got = att(*leaves, None, packed_seq_params=document_boundaries(cu, B * S, "cuda"))
        got.float().square().sum().backward()
        assert (got.float().cpu() - want).abs().max() <= tol * want.abs().max()
        for a, b in zip(leaves, cpu_leaves):
            assert (a.grad.float().cpu() - b.grad).abs().max() <= tol * b.grad.abs().max()


# ----------------------------------------------------------------- torch's varlen flash attention

def _varlen_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False,
                 return_aux=None):
    """The signature of torch 2.9/2.10's varlen_attn (no scale, no window)."""


def _varlen_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
                 scale=None, window_size=(-1, -1), enable_gqa=False):
    """The signature of torch 2.11's varlen_attn."""


def test_varlen_gate_names_the_torch_version():
    from megavlm.model.attention import varlen_unavailable

    why = varlen_unavailable(_varlen_2_10, "cuda", (9, 0))
    assert why is not None and f"torch {torch.__version__}" in why and ">= 2.11" in why
    assert "2.11" in varlen_unavailable(None, "cuda", (9, 0))
    assert "sm75" in varlen_unavailable(_varlen_2_11, "cuda", (7, 5))
    assert "CUDA" in varlen_unavailable(_varlen_2_11, "cpu")
    assert varlen_unavailable(_varlen_2_11, "cuda", (9, 0)) is None
    assert varlen_unavailable(_varlen_2_11, "cuda", (8, 0)) is None


def test_varlen_call_passes_scale_and_a_tuple_window():
    from megavlm.model.attention import varlen_documents

    calls = []

    def fake(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        calls.append((cu_q.dtype, cu_k is cu_q, max_q, max_k, kw))
        return q

    cu = _rows([[3, 5]], 8)
    params = document_boundaries(cu, 8, "cpu")
    q = torch.zeros(8, HEADS, HD)
    for causal, window in ((True, (-1, 0)), (False, (-1, -1))):
        varlen_documents(fake, q, q, q, params, 0.25, causal)
        dtype, same, mq, mk, kw = calls[-1]
        assert (dtype, same, mq, mk) == (torch.int32, True, 5, 5)
        assert kw == {"scale": 0.25, "window_size": window} and type(kw["window_size"]) is tuple


def test_required_varlen_raises_with_the_reason():
    from megavlm.model.attention import VarlenUnavailable

    att = SDPAttention(_config(), 1, AttnMaskType.causal, "self")
    att.use_varlen = "require"
    q = torch.zeros(8, HEADS, HD)
    with pytest.raises(VarlenUnavailable, match="CUDA|varlen"):
        att(q, q, q, None, packed_seq_params=document_boundaries(_rows([[3, 5]], 8), 8, "cpu"))
    att.use_varlen = True  # auto: the grouped SDPA path on CPU
    assert att(q, q, q, None, packed_seq_params=document_boundaries(_rows([[3, 5]], 8), 8, "cpu")).shape == (8, HEADS * HD)
