"""OpenLM / DCLM import and export, offline, on randomly initialised state dicts in open_lm's layout.

The source is a plain-PyTorch ReferenceDCLM with random weights and random (non-unit) norm gains,
saved the way open_lm saves (``{"state_dict": {"module.<name>": ...}}`` with each layer's rotary
buffer) and as safetensors. Checks: reading strips wrappers and refuses a state dict of another
shape or rotary buffers of another base; the
converted checkpoint holds the tensors exactly and computes the reference's logits at TP=1 and —
over two gloo processes — at TP=2, and a checkpoint written at TP=2 loads at TP=1; the check
itself fails when the QKV re-layout is wrong; export → re-import is the identity.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml

from megavlm.config import load_config
from megavlm.model import openlm_io
from megavlm.model.reference import ReferenceDCLM
from tests import synthetic
from tests.dist import ROOT, free_port

sys.path.insert(0, str(ROOT / "tools"))
import convert_openlm  # noqa: E402
import export as export_tool  # noqa: E402


def _raw(run_dir):
    # heads 4, hidden 64: TP=2 splits heads, the qk-norm gains and the vocab (128)
    return synthetic.tiny_run(str(run_dir), layers=2)


def openlm_state(cfg, seed: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    ref = ReferenceDCLM(cfg)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return {k: v.clone() for k, v in ref.state_dict().items()}


def inv_freq(head_dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    d = tmp_path_factory.mktemp("openlm")
    cfg_path = d / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(_raw(d / "run")))
    run = load_config(cfg_path)
    state = openlm_state(run.model)
    pt = d / "open_lm_checkpoint.pt"
    wrapped = {f"module.{k}": v for k, v in state.items()}
    for i in range(run.model.num_layers):  # as open_lm's RotaryEmbedding computes it
        wrapped[f"module.layers.{i}.attention.pos_embed.inv_freq"] = inv_freq(run.model.head_dim,
                                                                              run.model.rope_base)
    torch.save({"epoch": 1, "state_dict": wrapped}, pt)
    from safetensors.torch import save_file

    st = d / "model.safetensors"
    save_file({f"model.{k}": v.contiguous() for k, v in state.items()}, str(st))
    return {"dir": d, "config": cfg_path, "run": run, "state": state, "pt": pt, "st": st}


def test_read_strips_wrappers_and_validates(source):
    state, dropped = openlm_io.read_state_dict(source["pt"], source["run"].model)
    assert dropped == [f"module.layers.{i}.attention.pos_embed.inv_freq" for i in range(2)]
    assert set(state) == set(source["state"])
    assert all(torch.equal(state[k], source["state"][k]) for k in state)
    st, _ = openlm_io.read_state_dict(source["st"])
    assert set(st) == set(source["state"])
    openlm_io.validate_state_dict(state, source["run"].model)
    bad = dict(state)
    del bad["layers.1.feed_forward.w3.weight"]
    bad["layers.0.attention.in_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(openlm_io.ConversionError, match="missing 1.*shape mismatches"):
        openlm_io.validate_state_dict(bad, source["run"].model)


def test_rotary_base_mismatch_is_refused(source, parallel1, tmp_path):
    """A checkpoint whose inv_freq was computed with another base is refused, naming both bases;
    the right base in bf16 (rounded) passes; a buffer of another head_dim is refused."""
    run = source["run"]
    hd = run.model.head_dim
    assert run.model.rope_base == 10000.0
    wrapped = {f"module.{k}": v for k, v in source["state"].items()}
    wrong = tmp_path / "base5e5.pt"
    torch.save({"state_dict": {**wrapped, "module.layers.1.attention.pos_embed.inv_freq":
                               inv_freq(hd, 500000.0)}}, wrong)
    with pytest.raises(openlm_io.ConversionError,
                       match=r"layers\.1\.attention\.pos_embed\.inv_freq was computed with rope_base "
                             r"≈ 500000, but the recipe's model\.rope_base is 10000"):
        openlm_io.read_state_dict(wrong, run.model)
    with pytest.raises(openlm_io.ConversionError, match="rope_base"):  # the converter refuses it too
        convert_openlm.convert(run, parallel1, wrong, tmp_path / "no", log=lambda s: None)
    assert not (tmp_path / "no").exists()
    openlm_io.read_state_dict(wrong)  # without a config nothing is checked (export read-back)
    half = tmp_path / "bf16.pt"
    torch.save({"module.layers.0.attention.pos_embed.inv_freq": inv_freq(hd, 10000.0).bfloat16(),
                **wrapped}, half)
    openlm_io.read_state_dict(half, run.model)
    shape = tmp_path / "shape.pt"
    torch.save({**wrapped, "module.layers.0.attention.pos_embed.inv_freq": torch.ones(4)}, shape)
    with pytest.raises(openlm_io.ConversionError, match=r"shape \(4,\).*head_dim 16 needs \(8,\)"):
        openlm_io.read_state_dict(shape, run.model)


def test_convert_tp1_matches_reference_and_check_can_fail(source, parallel1, tmp_path):
    run = source["run"]
    out = tmp_path / "ckpt"
    rep = convert_openlm.convert(run, parallel1, source["pt"], out, log=lambda s: None)
    assert rep["check"]["tensors"] == "equal" and rep["check"]["rel"] < 1e-5
    assert rep["kept"] == ["projector.fc1.bias", "projector.fc1.weight", "projector.fc2.bias",
                           "projector.fc2.weight"]
    # the check discriminates: a reference whose in_proj is taken as per-head rows (megatron's
    # layout, i.e. a converter that forgot the QKV re-layout) is far from the converted model
    from megavlm.model.reference import qkv_openlm_to_megatron
    from megavlm.model.build import build_model

    wrong = dict(source["state"])
    for i in range(run.model.num_layers):
        k = f"layers.{i}.attention.in_proj.weight"
        wrong[k] = qkv_openlm_to_megatron(wrong[k], run.model.num_attention_heads)
    chunks, _ = build_model(run, parallel1, torch.float32, backend="local")
    from megavlm.checkpoint_format import load_model_weights

    load_model_weights(out, chunks)
    with pytest.raises(openlm_io.ConversionError, match="differs from the reference"):
        openlm_io.check_logits(chunks, wrong, run.model, tp_group=None, tp_size=1, pp_size=1)


@pytest.mark.distributed
def test_convert_at_tp2_and_load_at_tp1(source, parallel1, tmp_path):
    """Two gloo processes convert at TP=2; the converter reads its checkpoint back at TP=2 and
    checks logits (vocab shards gathered) against the reference. Then one process loads that
    TP=2 checkpoint at TP=1 and checks again."""
    out = tmp_path / "tp2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", "--master_addr=127.0.0.1",
           str(ROOT / "tools" / "convert_openlm.py"), "--input", str(source["st"]),
           "--config", str(source["config"]), "--out", str(out), "parallel.tp=2"]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert "check at tp 2, pp 1: tensors equal; logits vs reference" in p.stdout, p.stdout[-2000:]
    saved = load_config(out / "config.yaml")
    assert saved.parallel.tp == 2
    res = convert_openlm.verify(source["run"], parallel1, out, source["state"], log=lambda s: None)
    assert res["tp"] == 1 and res["rel"] < 1e-5


def test_export_reimports_exactly(source, parallel1, tmp_path):
    run = source["run"]
    ck = tmp_path / "ckpt"
    convert_openlm.convert(run, parallel1, source["pt"], ck, check=False, log=lambda s: None)
    out = tmp_path / "export"
    rep = export_tool.export(ck, out, parallel1, log=lambda s: None)
    assert rep["check"]["rel"] < 1e-5
    assert "projector.fc1.weight" in rep["tensors"]
    cfg = __import__("json").loads((out / "config.json").read_text())
    assert cfg["architecture"]["dim"] == run.model.hidden_size and cfg["architecture"]["qk_norm"]
    assert set(cfg["files"]) == {"model.safetensors", "projector.safetensors"}
    back, dropped = openlm_io.read_state_dict(out / "model.safetensors", run.model)  # rotary checked
    assert len(dropped) == run.model.num_layers
    assert not any(k.startswith("projector.") for k in back)  # open_lm has no projector
    for k, v in source["state"].items():
        assert torch.equal(back[k], v), k
    from safetensors.torch import load_file

    proj = load_file(str(out / "projector.safetensors"))
    assert sorted(proj) == ["projector.fc1.bias", "projector.fc1.weight", "projector.fc2.bias",
                            "projector.fc2.weight"]
    # and the exported file itself is a valid import source (its rotary buffers are checked)
    rep2 = convert_openlm.convert(run, parallel1, out / "model.safetensors", tmp_path / "again",
                                  log=lambda s: None)
    assert rep2["check"]["rel"] < 1e-5 and len(rep2["dropped"]) == run.model.num_layers
