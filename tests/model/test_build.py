"""megavlm.model.build: the model of a run for a layout and backend, built without changing the
caller's TransformerConfig, with the layout's placements on every parameter; loading a checkpoint
for inference needs neither the trainer nor the checkpoint's layout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megavlm.checkpoint_format import CheckpointError
from megavlm.config import load_config
from megavlm.model import layout
from megavlm.model.build import build_chunks, build_model, load_for_inference, model_dtype
from tests import synthetic

ROOT = Path(__file__).resolve().parents[2]


def _run(tmp, **kw):
    return load_config(raw=synthetic.tiny_run(str(tmp), layers=2, **kw))


def test_build_leaves_the_callers_config_alone(parallel1, tmp_path):
    from megavlm.model.specs import transformer_config

    run = _run(tmp_path)
    tc = transformer_config(run.model, run.parallel, dtype=torch.float32, batch_p2p_comm=False)
    assert tc.qk_layernorm is True
    (chunk,), built = build_chunks(tc, run.model, None)
    assert tc.qk_layernorm is True  # the caller's object is untouched
    assert built is not tc and chunk.config is built
    # the chunks' own copy no longer asks finalize_model_grads to all-reduce the split qk gains
    assert built.qk_layernorm is False
    att = chunk.decoder.layers[0].self_attention
    assert att.q_layernorm is not None and att.k_layernorm is not None  # built with qk-norm


def test_build_model_returns_the_config_its_chunks_hold(parallel1, tmp_path):
    chunks, tc = build_model(_run(tmp_path), parallel1, torch.float32, backend="local")
    assert all(c.config is tc for c in chunks)
    for c in chunks:
        numbers = layout.chunk_layer_numbers(c)
        for local, p in c.named_parameters():
            layout.check_parameter(layout.global_name(local, numbers), p)  # megatron agrees
            assert p.device == parallel1.device


def test_model_dtype(tmp_path):
    run = _run(tmp_path)
    assert model_dtype(run) == torch.float32
    run.precision.dtype = "auto"
    want = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    assert model_dtype(run) == want


def test_load_for_inference_refuses_what_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a complete megavlm checkpoint"):
        load_for_inference(tmp_path)
    (tmp_path / "meta.json").write_text('{"stage": "x", "step": 0, "steps": 0}')
    with pytest.raises(CheckpointError, match="no config.yaml"):
        load_for_inference(tmp_path)


def test_load_for_inference_without_the_trainer(parallel1, tmp_path):
    """A checkpoint written at TP=1 loads in a fresh process that never imports megavlm.train."""
    from megavlm.train import checkpoint as ckpt

    run = _run(tmp_path / "run", )
    run.seed = 11
    chunks, _ = build_model(run, parallel1, torch.float32, backend="local")
    with torch.no_grad():
        chunks[0].output_layer.weight.add_(1.0)  # not what a fresh build would hold
    out = tmp_path / "ck"
    ckpt.save(out, chunks, None, {"stage": "s", "step": 0, "steps": 0}, {}, 0, write_loader=False,
              run_config=run)
    want = chunks[0].output_layer.weight.detach().clone()
    torch.save(want, tmp_path / "want.pt")
    code = f"""
import sys, torch
from megavlm.model.build import load_for_inference
chunks, run = load_for_inference({str(out)!r})
assert not chunks[0].training
assert torch.equal(chunks[0].output_layer.weight, torch.load({str(tmp_path / 'want.pt')!r}))
leaked = sorted(m for m in sys.modules if m.startswith("megavlm.train"))
assert not leaked, leaked
print("ok")
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("MASTER_PORT", None)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


def test_inference_dtype_follows_the_training_precision_on_cuda(parallel1, tmp_path, monkeypatch):
    """Evaluation and generation load a bf16-trained checkpoint in bf16 on CUDA (it was loaded in
    fp32 everywhere: twice the memory and a slower model than the one trained), fp32 on a CPU,
    and an explicit dtype or MEGAVLM_INFERENCE_DTYPE wins."""
    from megavlm.model import build
    from megavlm.train import checkpoint as ckpt

    monkeypatch.delenv(build.INFERENCE_DTYPE_ENV, raising=False)
    run = _run(tmp_path / "run")
    run.precision.dtype = "bf16"
    chunks, _ = build_model(run, parallel1, torch.bfloat16, backend="local")
    out = tmp_path / "ck"
    ckpt.save(out, chunks, None, {"stage": "s", "step": 0, "steps": 0}, {}, 0, write_loader=False,
              run_config=run)
    want = chunks[0].output_layer.weight.detach().clone()

    def dtype_of(**kw):
        loaded, _ = load_for_inference(out, parallel1, **kw)
        return loaded[0].output_layer.weight.dtype, loaded[0].output_layer.weight

    assert dtype_of()[0] == torch.float32  # a CPU: fp32
    monkeypatch.setattr(build, "_cuda_bf16", lambda: (True, True))  # as on an H200 (device stays CPU)
    got, w = dtype_of()
    assert got == torch.bfloat16 and torch.equal(w, want)
    assert dtype_of(dtype=torch.float32)[0] == torch.float32
    monkeypatch.setenv(build.INFERENCE_DTYPE_ENV, "fp32")
    assert dtype_of()[0] == torch.float32
    monkeypatch.setenv(build.INFERENCE_DTYPE_ENV, "int8")
    with pytest.raises(ValueError, match="MEGAVLM_INFERENCE_DTYPE"):
        dtype_of()
    monkeypatch.delenv(build.INFERENCE_DTYPE_ENV)
    run.precision.dtype = "fp32"
    assert build.inference_dtype(run) == torch.float32
    run.precision.dtype = "bf16"
    monkeypatch.setattr(build, "_cuda_bf16", lambda: (True, False))
    with pytest.raises(RuntimeError, match="no bf16"):
        build.inference_dtype(run)
