"""A checkpoint without a module's ``_extra_state`` loads into a model that has one.

This is the local-spec → Transformer Engine move (TE's core attention carries FP8 metadata as
extra state; megatron's local attention has none). Reproduced on CPU by giving the local
core attention (megavlm's SDPAttention) an extra state for the duration of the test: the load must succeed with
the weights intact, and a checkpoint missing a real *parameter* must still be refused.
"""

from __future__ import annotations

import pytest
import torch

from megavlm.config import load_config
from megavlm.train import checkpoint as ckpt
from tests import synthetic


def _build(parallel1):
    from megavlm.model.build import build_model

    run = load_config(raw=synthetic.tiny_run("unused", layers=2))
    return build_model(run, parallel1, torch.float32)[0]


def test_missing_extra_state_loads_parameters_stay_strict(parallel1, tmp_path, monkeypatch):
    src = _build(parallel1)
    # whatever fills the core-attention seat (TE's attention carries extra state there)
    CoreAttention = type(src[0].decoder.layers[0].self_attention.core_attention)
    with torch.no_grad():
        for p in src[0].parameters():
            p.add_(0.01)
    path = tmp_path / "ckpt"
    ckpt.save(path, src, None, {"stage": "x", "step": 0, "steps": 0}, {}, 0, write_loader=False)

    calls = []
    monkeypatch.setattr(CoreAttention, "get_extra_state", lambda self: torch.tensor([3.0]), raising=False)
    monkeypatch.setattr(CoreAttention, "set_extra_state", lambda self, s: calls.append(s), raising=False)
    dst = _build(parallel1)
    assert any(k.endswith("core_attention._extra_state") for k in dst[0].state_dict())
    ckpt.load(path, dst, None)
    a, b = dict(src[0].named_parameters()), dict(dst[0].named_parameters())
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not calls  # absent in the checkpoint: the module keeps its own (fresh) extra state

    # a parameter the checkpoint lacks is still an error
    from megatron.core import dist_checkpointing

    monkeypatch.undo()
    bare = tmp_path / "bare"
    state = ckpt.model_sharded_state(src)
    state["model"] = {k: v for k, v in state["model"].items() if "final_layernorm" not in k}
    bare.mkdir()
    dist_checkpointing.save(state, str(bare))
    (bare / ckpt.META).write_text('{"stage": "x", "step": 0, "steps": 0}')
    with pytest.raises(Exception, match="final_layernorm"):
        ckpt.load(bare, _build(parallel1), None)
