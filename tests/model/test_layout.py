"""megavlm.model.layout: every parameter kind round-trips full -> shards -> full at TP 1/2/4, each
shard is the piece megatron's kernels expect (whole heads of the per-head grouped QKV, the
[gate shard; up shard] of the GLU fc1), and names without a rule are refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megavlm.model import layout

D, HEADS, FFN, V, DV, HV = 32, 4, 48, 64, 8, 16
HD = D // HEADS

SHAPES = {
    "embedding.word_embeddings.weight": (V, D),
    "output_layer.weight": (V, D),
    "decoder.final_layernorm.weight": (D,),
    "projector.fc1.weight": (HV, DV),
    "projector.fc1.bias": (HV,),
    "projector.fc2.weight": (D, HV),
    "projector.fc2.bias": (D,),
    "decoder.layers.3.input_layernorm.weight": (D,),
    "decoder.layers.3.pre_mlp_layernorm.weight": (D,),
    "decoder.layers.3.self_attention.linear_qkv.weight": (3 * D, D),
    "decoder.layers.3.self_attention.linear_proj.weight": (D, D),
    "decoder.layers.3.self_attention.q_layernorm.weight": (D,),
    "decoder.layers.3.self_attention.k_layernorm.weight": (D,),
    "decoder.layers.3.mlp.linear_fc1.weight": (2 * FFN, D),
    "decoder.layers.3.mlp.linear_fc2.weight": (D, FFN),
}
KINDS = {"vocab", "column", "row", "qkv", "glu", "qk_gain", "replicated"}


def _distinct(shape) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    return torch.arange(n, dtype=torch.float32).reshape(shape)


def test_every_kind_is_covered():
    assert {layout.placement(n).kind for n in SHAPES} == KINDS


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_round_trip(name, tp):
    full = _distinct(SHAPES[name])
    shards = [layout.shard(name, full, r, tp) for r in range(tp)]
    dim = layout.placement(name).dim
    for s in shards:
        want = list(full.shape)
        if dim is not None:
            want[dim] //= tp
        assert list(s.shape) == want, (name, tp)
    if dim is not None and tp > 1:  # every value lands in exactly one shard
        assert sorted(torch.cat([s.reshape(-1) for s in shards]).tolist()) == full.reshape(-1).tolist()
    assert torch.equal(layout.unshard(name, shards), full)


def test_known_placements():
    dims = {n: layout.placement(n).dim for n in SHAPES}
    assert dims["output_layer.weight"] == dims["embedding.word_embeddings.weight"] == 0
    assert dims["decoder.layers.3.self_attention.linear_proj.weight"] == 1
    assert dims["decoder.layers.3.mlp.linear_fc2.weight"] == 1
    assert dims["projector.fc2.weight"] == 1 and dims["projector.fc2.bias"] is None
    assert dims["decoder.layers.3.input_layernorm.weight"] is None


def test_fuse_split_qkv_is_per_head_grouped():
    q, k, v = (_distinct((D, D)) + 1000 * i for i in range(3))
    fused = layout.fuse_qkv(q, k, v, HEADS)
    for h in range(HEADS):  # rows [q_h; k_h; v_h] for each head h
        block = fused[3 * HD * h: 3 * HD * (h + 1)]
        assert torch.equal(block[:HD], q[h * HD:(h + 1) * HD])
        assert torch.equal(block[HD:2 * HD], k[h * HD:(h + 1) * HD])
        assert torch.equal(block[2 * HD:], v[h * HD:(h + 1) * HD])
    for a, b in zip(layout.split_qkv(fused, HEADS), (q, k, v)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("tp", [2, 4])
def test_qkv_shard_holds_whole_heads(tp):
    q, k, v = (torch.randn(D, D) for _ in range(3))
    name = "decoder.layers.0.self_attention.linear_qkv.weight"
    fused = layout.fuse_qkv(q, k, v, HEADS)
    per = HEADS // tp
    for r in range(tp):
        rows = slice(r * per * HD, (r + 1) * per * HD)
        want = layout.fuse_qkv(q[rows], k[rows], v[rows], per)
        assert torch.equal(layout.shard(name, fused, r, tp), want)


@pytest.mark.parametrize("tp", [2, 4])
def test_glu_shard_computes_its_slice_of_swiglu(tp):
    gate, up = torch.randn(FFN, D), torch.randn(FFN, D)
    x = torch.randn(5, D)
    name = "decoder.layers.0.mlp.linear_fc1.weight"
    full_act = F.silu(x @ gate.t()) * (x @ up.t())
    w = layout.fuse_glu(gate, up)
    for r in range(tp):
        g, u = (x @ layout.shard(name, w, r, tp).t()).chunk(2, dim=-1)  # megatron's local GLU
        part = FFN // tp
        assert torch.allclose(F.silu(g) * u, full_act[:, r * part:(r + 1) * part])


def test_unknown_names_and_bad_splits_are_refused():
    with pytest.raises(KeyError, match="decoder.layers.0.self_attention.linear_qkv.bias"):
        layout.placement("decoder.layers.0.self_attention.linear_qkv.bias")
    with pytest.raises(KeyError, match="no shard rule"):
        layout.shard("tok_embeddings.weight", torch.zeros(2, 2), 0, 2)
    with pytest.raises(ValueError, match="does not split into 4"):
        layout.shard("output_layer.weight", torch.zeros(6, 2), 0, 4)
    with pytest.raises(ValueError, match="heads"):
        layout.fuse_qkv(*(torch.zeros(6, 4) for _ in range(3)), heads=4)


def test_global_names():
    assert layout.global_name("decoder.layers.1.mlp.linear_fc2.weight", [5, 6]) == \
        "decoder.layers.5.mlp.linear_fc2.weight"
    assert layout.global_name("output_layer.weight", [5, 6]) == "output_layer.weight"
    assert layout.layer_and_suffix("decoder.layers.12.input_layernorm.weight") == (12, "input_layernorm.weight")
    assert layout.layer_and_suffix("projector.fc1.bias") == (None, "projector.fc1.bias")
