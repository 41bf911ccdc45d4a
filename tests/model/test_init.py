"""megavlm.model.init: the initial model depends on the seed and the global parameter names only,
so every tensor-parallel layout holds shards of the same full tensors, and the draws follow
OpenLM's distributions."""

from __future__ import annotations

import math

import pytest
import torch

from megavlm.config import ModelConfig, VisionConfig
from megavlm.model import layout
from megavlm.model.init import full_tensor, initialize

CFG = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96,
                  vocab_size=128, seq_length=32, vision=VisionConfig(embed_dim=24, num_patches=4))


@pytest.fixture(scope="module")
def chunk(parallel1):
    from megavlm.config import load_config
    from megavlm.model.build import build_model
    from tests import synthetic

    run = load_config(raw=synthetic.tiny_run("unused", layers=2))
    (c,), _ = build_model(run, parallel1, torch.float32, backend="local")
    return c, run


def _names(c) -> list[str]:
    numbers = layout.chunk_layer_numbers(c)
    return [layout.global_name(n, numbers) for n, _ in c.named_parameters()]


def test_model_holds_the_full_tensors_of_its_names(chunk):
    c, run = chunk
    numbers = layout.chunk_layer_numbers(c)
    for local, p in c.named_parameters():
        name = layout.global_name(local, numbers)
        assert torch.equal(p.detach(), full_tensor(name, run.model, run.seed)), name


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_shards_are_pieces_of_the_tp1_tensors(chunk, tp):
    """What a TP=tp rank r keeps (initialize: layout.shard of full_tensor) put back together is
    exactly the TP=1 model's parameter, for every parameter."""
    c, run = chunk
    params = dict(c.named_parameters())
    numbers = layout.chunk_layer_numbers(c)
    for local, p in params.items():
        name = layout.global_name(local, numbers)
        shards = [layout.shard(name, full_tensor(name, run.model, run.seed), r, tp) for r in range(tp)]
        assert torch.equal(layout.unshard(name, shards), p.detach()), name


def test_same_seed_same_tensors_other_seed_other_tensors(chunk):
    c, _ = chunk
    for name in _names(c):
        a, b = full_tensor(name, CFG, 3), full_tensor(name, CFG, 3)
        assert torch.equal(a, b), name
        if a.std() > 0:  # random draws (gains and biases are constants)
            assert not torch.equal(a, full_tensor(name, CFG, 4)), name


def test_distributions_follow_openlm():
    std = 1 / math.sqrt(CFG.hidden_size)
    emb = full_tensor("embedding.word_embeddings.weight", CFG, 0)
    assert emb.abs().max() <= 3 * std and abs(emb.std().item() - std) < 0.15 * std
    for i in (0, 1):  # output projections shrink with depth: 1/sqrt(2(layer+1))
        out = full_tensor(f"decoder.layers.{i}.self_attention.linear_proj.weight", CFG, 0)
        want = std / math.sqrt(2 * (i + 1))
        assert abs(out.std().item() - want) < 0.15 * want
    assert torch.equal(full_tensor("decoder.layers.1.self_attention.q_layernorm.weight", CFG, 0),
                       torch.ones(CFG.hidden_size))  # the full-width gain
    assert torch.equal(full_tensor("projector.fc2.bias", CFG, 0), torch.zeros(CFG.hidden_size))
    q, k, v = layout.split_qkv(full_tensor("decoder.layers.0.self_attention.linear_qkv.weight", CFG, 0),
                               CFG.num_attention_heads)
    assert not torch.equal(q, k) and not torch.equal(k, v)
    gate, up = full_tensor("decoder.layers.0.mlp.linear_fc1.weight", CFG, 0).chunk(2)
    assert not torch.equal(gate, up)  # two independent draws, [gate; up]


def test_a_parameter_without_a_rule_is_an_error(chunk):
    c, run = chunk
    with pytest.raises(KeyError, match="no rule for parameter 'decoder.layers.0.mlp.extra'"):
        full_tensor("decoder.layers.0.mlp.extra", run.model, 0)

    c.register_parameter("stray", torch.nn.Parameter(torch.zeros(2)))
    try:
        with pytest.raises(KeyError, match="stray"):
            initialize([c], run.model, run.seed, 0, 1)
    finally:
        del c.stray
