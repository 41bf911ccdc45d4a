"""The forward step: packed rows reach the model as document boundaries over the flattened rows,
unpacked rows stay [B, S] (flattened too under pipeline parallel, so every microbatch has one
shape on the wire), bad boundaries and wrong row lengths are refused naming the value — and a
training step (forward and backward) allocates no tensor with two trailing dims of the sequence
length, where the old dense-mask attention allocates several."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megavlm.config import load_config
from megavlm.data.batch import Batch, Sample, collate
from megavlm.model.attention import BoundaryError
from megavlm.train.step import StepLayout, make_forward_step, model_inputs
from tests import synthetic


def _doc(n, start=4):
    t = np.arange(start, start + n) % 90 + 4
    return Sample(t, np.ones(n, bool))


def _packed_batch(S=16):
    rows = [[_doc(5), _doc(11)], [_doc(3), _doc(1)], [_doc(S)]]  # row 1 ends in padding
    return collate(rows, S, synthetic.PAD)


def test_packed_rows_are_flattened_with_their_boundaries():
    b = _packed_batch()
    x = model_inputs(b, "cpu")
    assert x.tokens.shape == x.position_ids.shape == x.labels.shape == x.loss_mask.shape == (1, 48)
    assert torch.equal(x.tokens[0], b.tokens.reshape(-1))
    assert torch.equal(x.position_ids[0], b.position_ids.reshape(-1))
    p = x.packed_seq_params
    assert p.qkv_format == "thd"
    assert p.cu_seqlens_q.tolist() == [0, 5, 16, 19, 20, 32, 48] == b.cu_seqlens.tolist()
    assert p.max_seqlen_q == 16
    assert p.cu_seqlens_q.dtype == torch.int32


def test_image_slots_follow_the_flattening():
    S, P = 32, 4
    rows = synthetic.global_rows(2, 0, 3, S, P, 8, images=True)
    b = collate(rows, S, synthetic.PAD, embed_dtype=None)
    x = model_inputs(b, "cpu")
    for (row, start), (zero, flat) in zip(b.image_slots.tolist(), x.image_slots.tolist()):
        assert zero == 0 and flat == row * S + start
        assert torch.equal(x.tokens[0, flat:flat + P], b.tokens[row, start:start + P])


def test_unpacked_rows_stay_rows_unless_pipelined():
    S = 8
    b = collate([[_doc(S)], [_doc(S, 9)]], S, synthetic.PAD)
    assert b.cu_seqlens is None
    x = model_inputs(b, "cpu")
    assert x.tokens.shape == (2, S) and x.packed_seq_params is None
    layout = StepLayout(S, 2, pipelined=True)
    assert layout.flatten_always and layout.p2p_shape == (2 * S, 1)
    y = model_inputs(b, "cpu", flatten_unpacked=layout.flatten_always)
    assert y.tokens.shape == (1, 2 * S)
    assert y.packed_seq_params.cu_seqlens_q.tolist() == [0, S, 2 * S]
    assert StepLayout(S, 2).p2p_shape == (S, 2) and not StepLayout(S, 1, pipelined=True).flatten_always


def test_bad_boundaries_and_row_lengths_name_the_value():
    b = _packed_batch()
    short = Batch(b.tokens, b.labels, b.loss_mask, b.position_ids, cu_seqlens=b.cu_seqlens[:-1])
    with pytest.raises(BoundaryError, match="ends at 32, but the rows hold 48 positions"):
        model_inputs(short, "cpu")
    across = Batch(b.tokens, b.labels, b.loss_mask, b.position_ids,
                   cu_seqlens=torch.tensor([0, 5, 19, 20, 32, 48], dtype=torch.int32))
    with pytest.raises(BoundaryError, match="no boundary at the end of row 0 .position 16."):
        model_inputs(across, "cpu")
    with pytest.raises(ValueError, match="rows of 16 positions, but this stage's seq_length is 32"):
        StepLayout(32, 3).check(b)
    with pytest.raises(ValueError, match="3 rows, but pipeline stages exchange micro_batch_size=2"):
        StepLayout(16, 2, pipelined=True).check(b)


class _SquareTensors(TorchDispatchMode):
    """Records every op output whose two trailing dims are both one of ``sizes``."""

    def __init__(self, sizes):
        super().__init__()
        self.sizes, self.found = set(sizes), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] in self.sizes \
                    and t.shape[-2] in self.sizes:
                self.found.append((str(func), tuple(t.shape)))
        return out


def test_training_step_builds_no_sequence_square(parallel1):
    """Forward + backward of one packed microbatch at seq 1024 (two rows, flattened to 2048):
    nothing [.., S, S] or [.., T, T] exists, only the model's own per-document fused kernels."""
    from megavlm.train.loop import build_model

    S = 1024
    run = load_config(raw=synthetic.tiny_run("unused", layers=1),
                      overrides=[f"model.seq_length={S}"])
    (chunk,), _ = build_model(run, parallel1, torch.float32)
    rows = [[_doc(300), _doc(500), _doc(224)], [_doc(1000)]]
    batch = collate(rows, S, synthetic.PAD)
    step = make_forward_step(z_loss=1e-4, tp_group=None, device=torch.device("cpu"),
                             layout=StepLayout(S, 2))
    with _SquareTensors({S, 2 * S}) as rec:
        hidden, loss_func = step(iter([batch]), chunk)
        loss, count, _ = loss_func(hidden)
        loss.backward()
    assert rec.found == [], rec.found[:5]
    assert int(count) == int(batch.loss_mask.sum()) and torch.isfinite(loss)
    assert chunk.decoder.layers[0].self_attention.linear_qkv.weight.grad.abs().max() > 0


def test_square_detector_sees_the_dense_mask_path(parallel1):
    """The detector can fail: megatron's DotProductAttention with the dense document mask (the
    old training path) allocates [B, 1, S, S] and [B, heads, S, S] tensors at the same size."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megavlm.config import ModelConfig, ParallelConfig
    from megavlm.model.reference import document_mask
    from megavlm.model.specs import transformer_config

    S = 1024
    cfg = transformer_config(ModelConfig(hidden_size=64, num_attention_heads=4), ParallelConfig(),
                             dtype=torch.float32, batch_p2p_comm=False)
    att = DotProductAttention(cfg, 1, AttnMaskType.causal, "self")
    q = torch.randn(S, 2, 4, 16, requires_grad=True)
    cu = torch.tensor([0, 300, 800, S, 2 * S])
    with _SquareTensors({S}) as rec:
        att(q, q, q, document_mask(cu, 2, S), attn_mask_type=AttnMaskType.causal).sum().backward()
    shapes = {s for _, s in rec.found}
    assert (2, 1, S, S) in shapes and (2, 4, S, S) in shapes
