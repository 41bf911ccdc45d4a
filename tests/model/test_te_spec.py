"""The Transformer Engine spec: chosen only when usable, FP8 wiring, TE vs local on the same weights.

CPU part: backend selection never picks TE without a GPU, nothing TE-related is imported on the
CPU path, precision.fp8 maps onto megatron's TransformerConfig fp8 fields and is refused where it
cannot run. GPU part (``gpu`` marker, skipped without TE + CUDA): the TE model and the local model
built from the same seed (megavlm.model.init is spec-independent) give the same hidden states on
causal rows (TE's causal sbhd path) and on packed and image rows at micro-batch 4 (TE's THD path
with cu_seqlens over the flattened rows) in bf16, and FP8 (delayed and current scaling) trains a step and
stays close to bf16.
"""

from __future__ import annotations

import sys

import pytest
import torch

from megavlm.config import ConfigError, ModelConfig, ParallelConfig, load_config
from megavlm.model.specs import fp8_fields, select_backend, te_usable, transformer_config
from tests import synthetic


def test_auto_is_local_without_te_and_gpu():
    if te_usable():
        pytest.skip("TE and a GPU are usable here")
    assert select_backend("auto") == "local"
    assert select_backend("local") == "local"
    with pytest.raises(RuntimeError, match="transformer-engine and a CUDA GPU"):
        select_backend("te")


def test_cpu_path_imports_nothing_from_te(parallel1):
    """Building the model on the CPU path must not import transformer_engine (a driverless TE
    raises OSError on import); the TE spec module itself imports without TE. (megatron imports
    its own TE extension module under a guard; TE itself must stay out.)"""
    if te_usable():
        pytest.skip("TE and a GPU are usable here")
    import megavlm.model.te_spec  # noqa: F401
    from megavlm.model.build import build_model

    run = load_config(raw=synthetic.tiny_run("unused", layers=2))
    (chunk,), tc = build_model(run, parallel1, torch.float32)
    assert not [m for m in sys.modules if m.split(".")[0] == "transformer_engine"]
    assert tc.fp8 is None
    assert type(chunk.decoder.layers[0].self_attention.linear_qkv).__name__ == "ColumnParallelLinear"
    assert type(chunk.decoder.layers[0].self_attention.core_attention).__name__ == "SDPAttention"


def test_fp8_fields_map_recipes():
    assert fp8_fields("none") == {}
    d = fp8_fields("delayed", "hybrid", 16)
    assert d == dict(fp8="hybrid", fp8_recipe="delayed", fp8_amax_history_len=16,
                     fp8_amax_compute_algo="max", fp8_margin=0)
    assert fp8_fields("current", "e4m3") == dict(fp8="e4m3", fp8_recipe="tensorwise")
    with pytest.raises(ValueError):
        fp8_fields("mxfp8")


def test_fp8_needs_te_backend():
    with pytest.raises(RuntimeError, match="Transformer Engine backend"):
        transformer_config(ModelConfig(), ParallelConfig(), dtype=torch.bfloat16, batch_p2p_comm=False,
                           backend="local", fp8="delayed")


def test_fp8_config_validation():
    def raw():
        return synthetic.tiny_run("unused", layers=2)

    with pytest.raises(ConfigError, match="model.backend"):
        load_config(raw=raw(), overrides=["precision.fp8=current", "precision.dtype=bf16", "model.backend=local"])
    with pytest.raises(ConfigError, match="precision"):
        load_config(raw=raw(), overrides=["precision.fp8=delayed", "precision.dtype=fp32"])
    run = load_config(raw=raw(), overrides=["precision.fp8=delayed", "precision.dtype=bf16"])
    assert run.precision.fp8 == "delayed" and run.model.backend == "auto"


def test_fp8_on_cpu_is_a_clear_error(parallel1):
    """Where TE is not usable, asking for FP8 fails when the model is built, naming the cause."""
    if te_usable():
        pytest.skip("TE and a GPU are usable here")
    from megavlm.model.build import build_model

    run = load_config(raw=synthetic.tiny_run("unused", layers=2), overrides=["precision.fp8=delayed", "precision.dtype=bf16"])
    with pytest.raises(RuntimeError, match="Transformer Engine"):
        build_model(run, parallel1, torch.bfloat16)


# ------------------------------------------------------------------------------------------ GPU

def _gpu_run(fp8: str = "none"):
    raw = synthetic.tiny_run("unused", layers=2)
    # TE/FP8 GEMMs want widths that are multiples of 16; keep the tiny shape otherwise
    over = ["model.seq_length=128", "model.hidden_size=256", "model.ffn_hidden_size=768",
            "model.num_attention_heads=4", f"precision.fp8={fp8}", "precision.dtype=bf16"]
    return load_config(raw=raw, overrides=over)


def _hidden(chunk, batch):
    """Hidden states through the training layout: packed rows flattened to one thd sequence with
    their document boundaries (TE's cu_seqlens path), unpacked rows [S, B] causal."""
    from megavlm.train.step import model_inputs

    dev = next(chunk.parameters()).device
    x = model_inputs(batch, dev)
    return chunk(x.tokens, x.position_ids, x.packed_seq_params, x.image_embeds, x.image_slots).float()


@pytest.mark.parametrize("images", [False, True])
@pytest.mark.gpu
@pytest.mark.skipif(not te_usable(), reason="needs transformer-engine and a CUDA GPU")
def test_te_equals_local_on_same_weights(parallel1, images):
    from megavlm.data.batch import collate
    from megavlm.model.export import full_tensors
    from megavlm.model.build import build_model

    run = _gpu_run()
    (te,), _ = build_model(run, parallel1, torch.bfloat16, backend="te")
    (local,), _ = build_model(run, parallel1, torch.bfloat16, backend="local")
    ft, fl = full_tensors([te]), full_tensors([local])
    assert set(ft) == set(fl)
    for k in ft:
        assert torch.equal(ft[k], fl[k]), k
    assert "TEColumnParallelLinear" in type(te.decoder.layers[0].self_attention.linear_qkv).__name__
    core = type(te.decoder.layers[0].self_attention.core_attention).__name__
    assert core == "DocumentTEDotProductAttention"
    S, P, W = run.model.seq_length, run.model.vision.num_patches, run.model.vision.embed_dim
    rows = synthetic.global_rows(5, 0, 4, S, P, W, images)
    batch = collate(rows, S, synthetic.PAD, embed_dtype=None)
    assert batch.cu_seqlens is not None  # packed rows, micro-batch 4: TE's THD path, flattened
    causal = collate([r for r in synthetic.global_rows(9, 0, 8, S, P, W, False) if len(r) == 1][:3],
                     S, synthetic.PAD, embed_dtype=None)
    assert causal.cu_seqlens is None  # unpacked rows: TE's causal sbhd path
    for b_ in (batch, causal):
        with torch.no_grad():
            a, b = _hidden(te, b_), _hidden(local, b_)
        rel = (a - b).norm() / b.norm()
        assert rel < 2e-2, f"TE vs local relative difference {rel:.3e}"


@pytest.mark.parametrize("fp8", ["delayed", "current"])
@pytest.mark.gpu
@pytest.mark.skipif(not te_usable(), reason="needs transformer-engine and a CUDA GPU")
def test_fp8_forward_backward_close_to_bf16(parallel1, fp8):
    from megavlm.data.batch import collate
    from megavlm.model.build import build_model

    run8, run16 = _gpu_run(fp8), _gpu_run()
    (m8,), tc8 = build_model(run8, parallel1, torch.bfloat16)
    (m16,), _ = build_model(run16, parallel1, torch.bfloat16)
    assert tc8.fp8 == "hybrid" and tc8.fp8_recipe == {"delayed": "delayed", "current": "tensorwise"}[fp8]
    S, P, W = run8.model.seq_length, run8.model.vision.num_patches, run8.model.vision.embed_dim
    rows = [r for r in synthetic.global_rows(9, 0, 8, S, P, W, False) if len(r) == 1][:4]
    batch = collate(rows, S, synthetic.PAD, embed_dtype=None)  # causal rows: TE's fused path
    h8 = _hidden(m8, batch)
    h8.square().mean().backward()
    grads = [p.grad for p in m8.decoder.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    with torch.no_grad():
        h16 = _hidden(m16, batch)
    rel = (h8.detach() - h16).norm() / h16.norm()
    assert rel < 0.1, f"FP8 ({fp8}) vs bf16 relative difference {rel:.3e}"


def test_native_gain_layernorm_is_the_same_function(parallel1):
    """The TE spec's norm equals GainLayerNorm: exactly in fp32, to bf16 rounding in bf16."""
    from megavlm.model.norms import GainLayerNorm
    from megavlm.model.te_spec import NativeGainLayerNorm

    tc = transformer_config(ModelConfig(), ParallelConfig(), dtype=torch.float32, batch_p2p_comm=False)
    a, b = GainLayerNorm(tc, 128, 1e-5), NativeGainLayerNorm(tc, 128, 1e-5)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        a.weight.copy_(1 + 0.3 * torch.randn(128, generator=g))
        b.weight.copy_(a.weight)
    x = 3 + 2 * torch.randn(4, 2, 128, generator=g)
    assert torch.equal(a(x), b(x))
    xb = x.bfloat16()
    ya, yb = a(xb), b(xb)
    assert ya.dtype == yb.dtype == torch.bfloat16
    assert ((ya.float() - yb.float()).abs() <= 2 ** -7 * ya.float().abs() + 1e-2).all()
    assert [n for n, _ in b.named_parameters()] == ["weight"]


def test_specs_and_te_spec_do_not_import_each_other():
    """The local and TE specs both take the seats from megavlm.model.block; te_spec never imports
    specs (not even inside a function), so there is no cycle, and one name per spec function."""
    import ast
    import inspect

    import megavlm.model.specs as specs
    import megavlm.model.te_spec as te_spec

    def imported(mod):
        tree = ast.parse(inspect.getsource(mod))
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
            a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}

    assert "megavlm.model.specs" not in imported(te_spec)
    assert "megavlm.model.block" in imported(te_spec) and "megavlm.model.block" in imported(specs)
    assert specs.dclm_te_layer_spec is te_spec.dclm_te_layer_spec
    assert not hasattr(te_spec, "dclm_block") or te_spec.dclm_block.__module__ == "megavlm.model.block"
