"""The exported ``model.safetensors`` has exactly the state-dict keys (and shapes) of an open_lm
``Transformer`` of the same config, so open_lm loads it with ``strict=True`` (issue 25).

open_lm is not installable here (no PyPI release), so the key list below is written down from
open_lm's source (github.com/mlfoundations/open_lm, read 2026-12-04), for the configuration DCLM
uses (``open_lm_1b_swiglutorch.json``: model_norm gain_only_lp_layer_norm, ffn_type swiglu_torch,
qk_norm true, positional_embedding_type rotary, post_embed_norm false, weight_tying false):

* ``open_lm/model.py`` ``Transformer``: ``tok_embeddings`` (nn.Embedding [vocab, dim]), ``layers``
  (ModuleList of ``Block``), ``norm`` (norm_type(dim)), ``output`` (nn.Linear(dim, vocab, bias=False));
  ``post_embed_norm`` is nn.Identity when off (no keys); weight tying off = two tensors.
* ``Block``: ``attention`` (``CustomAttn``), ``feed_forward`` (swiglu_torch = ``SwiGLUTorch`` with
  bias=False: ``w12`` Linear(dim, 2*hidden), ``w3`` Linear(hidden, dim)), ``attention_norm`` and
  ``ffn_norm`` (norm_type(dim)); hidden = 256 * ((int(8*dim/3) + 255) // 256).
* ``CustomAttn``: ``in_proj`` Linear(dim, 3*dim, bias=False), ``out_proj`` Linear(dim, dim,
  bias=False), ``pos_embed`` (``RotaryWithCast``), ``q_norm`` / ``k_norm`` = norm_type(n_heads *
  head_dim) when qk_norm, else nn.Identity (no keys).
* ``open_lm/norms.py`` gain_only_lp_layer_norm = ``LPLayerNorm(elementwise_gain=True,
  elementwise_bias=False)``: a ``weight`` parameter, ``bias`` registered as None (not in the state dict).
* ``open_lm/positional_embedding/rotary.py`` ``RotaryEmbedding(head_dim, seq_len)``: a persistent
  buffer ``inv_freq`` of head_dim // 2 entries (its cos/sin caches are plain attributes, not saved).
"""

from __future__ import annotations

import torch

from megavlm.config import ModelConfig, load_config
from megavlm.model import openlm_io
from megavlm.model.reference import ReferenceDCLM, from_openlm_names
from tests.dist import ROOT


def open_lm_keys(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of open_lm's ``Transformer(...).state_dict()`` for ``cfg`` (see the docstring)."""
    d, v, hd = cfg.hidden_size, cfg.vocab_size, cfg.head_dim
    hidden = 256 * ((int(2 * 4 * d / 3) + 256 - 1) // 256)
    keys = {"tok_embeddings.weight": (v, d), "norm.weight": (d,), "output.weight": (v, d)}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        keys.update({
            p + "attention.in_proj.weight": (3 * d, d),
            p + "attention.out_proj.weight": (d, d),
            p + "attention.pos_embed.inv_freq": (hd // 2,),
            p + "feed_forward.w12.weight": (2 * hidden, d),
            p + "feed_forward.w3.weight": (d, hidden),
            p + "attention_norm.weight": (d,),
            p + "ffn_norm.weight": (d,),
        })
        if cfg.qk_norm:
            keys[p + "attention.q_norm.weight"] = (cfg.num_attention_heads * hd,)
            keys[p + "attention.k_norm.weight"] = (cfg.num_attention_heads * hd,)
    return keys


def _full(cfg: ModelConfig, mult: int = 2) -> dict[str, torch.Tensor]:
    """A model's full tensors under megavlm's global names (language model + projector)."""
    full = from_openlm_names(ReferenceDCLM(cfg).state_dict(), cfg)
    e = cfg.vision.embed_dim
    full.update({"projector.fc1.weight": torch.randn(mult * e, e), "projector.fc1.bias": torch.randn(mult * e),
                 "projector.fc2.weight": torch.randn(cfg.hidden_size, mult * e),
                 "projector.fc2.bias": torch.randn(cfg.hidden_size)})
    return full


def _cfg(**kw) -> ModelConfig:
    base = dict(num_layers=3, hidden_size=96, num_attention_heads=4, ffn_hidden_size=256, vocab_size=64,
                seq_length=32, rope_base=500000.0)
    base.update(kw)
    return ModelConfig(**base)


def test_exported_file_has_exactly_open_lm_keys(tmp_path):
    from safetensors.torch import load_file

    for cfg in (_cfg(), _cfg(qk_norm=False)):
        assert openlm_io.openlm_swiglu_hidden(cfg.hidden_size) == cfg.ffn_hidden_size == 256
        run = load_config(raw={"model": {k: getattr(cfg, k) for k in (
            "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size",
            "seq_length", "rope_base", "qk_norm")}})
        tensors = openlm_io.export_tensors(_full(cfg), cfg, torch.bfloat16)
        out = openlm_io.write_export(tensors, openlm_io.export_config(run), tmp_path / str(cfg.qk_norm))
        model = load_file(str(out / "model.safetensors"))
        want = open_lm_keys(cfg)
        assert set(model) == set(want), (sorted(set(model) ^ set(want)))
        assert {k: tuple(t.shape) for k, t in model.items()} == want
        # the rotary buffers hold the recipe's base (open_lm's formula), in fp32 like open_lm's
        hd = cfg.head_dim
        expect = 1.0 / (cfg.rope_base ** (torch.arange(0, hd, 2).float() / hd))
        assert model["layers.2.attention.pos_embed.inv_freq"].dtype == torch.float32
        torch.testing.assert_close(model["layers.2.attention.pos_embed.inv_freq"], expect)
        proj = load_file(str(out / "projector.safetensors"))
        assert set(proj) == {"projector.fc1.weight", "projector.fc1.bias", "projector.fc2.weight",
                             "projector.fc2.bias"}
        assert not list(out.glob("*.tmp"))
        # and what was exported re-imports under the same recipe (the rotary check passes)
        back, dropped = openlm_io.read_state_dict(out / "model.safetensors", cfg)
        openlm_io.validate_state_dict(back, cfg)
        assert len(dropped) == cfg.num_layers


def test_dclm_1b_export_layout_is_open_lms():
    """The DCLM-1B recipe builds the shapes open_lm builds (SwiGLU 5632 for dim 2048), and its
    export config says so; a width open_lm cannot build is flagged, not hidden."""
    run = load_config(ROOT / "launch/configs/dclm-1b.yaml")
    m = run.model
    assert openlm_io.openlm_swiglu_hidden(m.hidden_size) == m.ffn_hidden_size == 5632
    keys = open_lm_keys(m)
    assert len(keys) == 3 + 24 * 9 and keys["layers.0.attention.pos_embed.inv_freq"] == (64,)
    cfg = openlm_io.export_config(run)
    assert cfg["open_lm_loadable"] and cfg["open_lm_model_config"]["ffn_type"] == "swiglu_torch"
    odd = load_config(raw={"model": {"hidden_size": 128, "ffn_hidden_size": 384}})
    note = openlm_io.export_config(odd)
    assert not note["open_lm_loadable"] and "512" in note["open_lm_note"]
