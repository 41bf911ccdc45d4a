"""OpenLM / DCLM state dicts in and out of a megavlm model, at any tensor/pipeline layout.

Why: DCLM-1B and other open_lm models are published as state dicts under open_lm's parameter
names (``tok_embeddings``, ``layers.N.attention.in_proj``, ``feed_forward.w12`` …). Importing one
means renaming (megavlm.model.reference.from_openlm_names owns the names), placing each full
tensor's shard (megavlm.model.layout owns the shard arithmetic) into the parameters this rank
holds, and proving the result computes the same function as an independent implementation:
:func:`check_logits` runs the megatron model and megavlm.model.reference.ReferenceDCLM (plain
PyTorch, loaded straight from the OpenLM state dict) on the same tokens. A checkpoint's rotary
``inv_freq`` buffers are checked against the recipe's ``model.rope_base`` (a checkpoint trained
with another base would otherwise import with wrong angles).

Export is the way back: ``model.safetensors`` holds exactly the state dict of an open_lm
``Transformer`` of the same config (it loads with ``strict=True``: every weight under open_lm's
name plus each layer's rotary buffer ``layers.N.attention.pos_embed.inv_freq``), the projector,
which open_lm does not have, goes to ``projector.safetensors`` (``projector.fc1/fc2`` weight and
bias), and ``config.json`` describes both (:data:`OPENLM_FILES`).

Used by tools/convert_openlm.py and tools/export.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from megavlm.config import ModelConfig, RunConfig
from megavlm.model import layout
from megavlm.model.reference import ReferenceDCLM, to_openlm_names

_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")  # DDP, torch.compile, HF's OpenLM wrapper
_ROTARY_BUFFER = re.compile(r"(^|\.)(inv_freq|pos_embed\..*|rotary.*\.(cos|sin)_cached)$")
ROTARY_KEY = "layers.{i}.attention.pos_embed.inv_freq"
"""open_lm's rotary buffer (open_lm/positional_embedding/rotary.py ``RotaryEmbedding`` registers
``inv_freq`` = 1 / 10000^(arange(0, head_dim, 2) / head_dim), a persistent buffer, under each
layer's ``attention.pos_embed``); the exporter writes it for the recipe's ``rope_base``."""
OPENLM_FILES = {
    "model.safetensors": "the language model as an open_lm Transformer state dict (open_lm names, "
                         "rotary inv_freq buffers included): load_state_dict(..., strict=True)",
    "projector.safetensors": "the projector (not part of open_lm): projector.fc1.{weight,bias}, "
                             "projector.fc2.{weight,bias}; Linear(d_v, m*d_v), GELU, Linear(m*d_v, d_model)",
}
"""What the exporter writes besides config.json, and what each file holds."""


class ConversionError(ValueError):
    """A state dict that does not fit the model config, or a conversion that fails its check."""


# ---------------------------------------------------------------------------------- reading

def read_state_dict(path: str | Path, cfg: Optional[ModelConfig] = None) -> tuple[dict[str, Tensor], list[str]]:
    """(OpenLM-named tensors, dropped rotary buffer names) of a .pt/.bin or .safetensors file.

    Accepts a bare state dict or open_lm's training checkpoint ``{"state_dict": ...}``, strips the
    DDP / torch.compile / Hugging Face wrapper prefixes, and drops RoPE buffers (recomputed here
    from ``model.rope_base``). With ``cfg``, every ``inv_freq`` buffer is first checked against
    ``cfg.rope_base`` and ``cfg.head_dim`` (:func:`check_rotary`): a mismatch is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no state dict at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        raw = load_file(str(path))
    else:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model"):
            if isinstance(raw, dict) and isinstance(raw.get(key), dict):
                raw = raw[key]
    if not isinstance(raw, dict):
        raise ConversionError(f"{path}: expected a state dict, got {type(raw).__name__}")
    out, dropped, rotary = {}, [], {}
    for name, t in raw.items():
        if not isinstance(t, Tensor):
            continue
        stripped = name
        changed = True
        while changed:
            changed = False
            for pre in _WRAPPER_PREFIXES:
                if stripped.startswith(pre):
                    stripped, changed = stripped[len(pre):], True
        if _ROTARY_BUFFER.search(stripped):
            dropped.append(name)
            rotary[name] = t
            continue
        out[stripped] = t
    if cfg is not None:
        check_rotary(rotary, cfg, where=str(path))
    return out, dropped


def openlm_inv_freq(head_dim: int, base: float) -> Tensor:
    """Rotary inverse frequencies as open_lm computes them: 1 / base^(arange(0, hd, 2) / hd), fp32."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))


def check_rotary(buffers: dict[str, Tensor], cfg: ModelConfig, where: str = "state dict") -> int:
    """Refuse rotary ``inv_freq`` buffers that do not belong to ``cfg.rope_base`` / ``cfg.head_dim``,
    naming the buffer, the base it was computed with and the recipe's. Other rotary caches are not
    checked (open_lm does not save them). Returns how many buffers were checked."""
    want = openlm_inv_freq(cfg.head_dim, cfg.rope_base)
    checked = 0
    for name, t in buffers.items():
        if not name.endswith("inv_freq"):
            continue
        checked += 1
        if tuple(t.shape) != tuple(want.shape):
            raise ConversionError(f"{where}: rotary buffer {name} has shape {tuple(t.shape)}, but the "
                                  f"recipe's head_dim {cfg.head_dim} needs ({cfg.head_dim // 2},)")
        got = t.detach().float()
        tol = 1e-5 if t.dtype in (torch.float32, torch.float64) else 1e-2  # 16-bit buffers round
        rel = ((got - want).abs() / want).max().item()
        if not rel <= tol:
            base = _base_of(got, cfg.head_dim)
            raise ConversionError(
                f"{where}: rotary buffer {name} was computed with rope_base "
                f"{'≈ %g' % float('%.4g' % base) if base else '(unrecognisable)'}, but the recipe's model.rope_base is "
                f"{cfg.rope_base:g} (largest relative difference {rel:.3g}); set model.rope_base to the "
                "checkpoint's base, or import the checkpoint the recipe means")
    return checked


def _base_of(inv_freq: Tensor, head_dim: int) -> Optional[float]:
    """The base an inv_freq vector was computed with (its second entry is base^(-2/hd)), if any."""
    if inv_freq.numel() < 2 or not 0.0 < float(inv_freq[1]) < 1.0:
        return None
    return float(inv_freq[1].double() ** (-head_dim / 2.0))


def validate_state_dict(state: dict[str, Tensor], cfg: ModelConfig) -> None:
    """Names and shapes against the reference model of ``cfg``; one error listing what differs."""
    want = {k: tuple(v.shape) for k, v in ReferenceDCLM(cfg).state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    shapes = [f"{k}: file {have[k]} vs config {want[k]}" for k in sorted(set(want) & set(have))
              if want[k] != have[k]]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} (e.g. {missing[:3]})")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} (e.g. {unexpected[:3]})")
    if shapes:
        problems.append(f"shape mismatches: {shapes[:3]}")
    if problems:
        raise ConversionError("state dict does not fit model config: " + "; ".join(problems))


# --------------------------------------------------------------------------------- placing

def place_full_tensors(chunks: Iterable[torch.nn.Module], full: dict[str, Tensor], tp_rank: int,
                       tp_size: int, keep: tuple[str, ...] = ("projector.",)) -> list[str]:
    """Copy this rank's shard of each full tensor (global megatron names) into the chunks.

    Parameters whose names start with ``keep`` may be absent from ``full`` and keep their values
    (OpenLM has no projector); any other absent parameter is an error. Returns the kept names."""
    kept = []
    with torch.no_grad():
        for chunk in chunks:
            numbers = layout.chunk_layer_numbers(chunk)
            for local, p in chunk.named_parameters():
                name = layout.global_name(local, numbers)
                if name not in full:
                    if name.startswith(keep):
                        kept.append(name)
                        continue
                    raise ConversionError(f"no tensor for parameter {name}")
                layout.check_parameter(name, p)
                value = layout.shard(name, full[name], tp_rank, tp_size)
                if tuple(value.shape) != tuple(p.shape):
                    raise ConversionError(f"{name}: shard {tuple(value.shape)} vs parameter {tuple(p.shape)}")
                p.copy_(value.to(p.dtype))
    return kept


# ---------------------------------------------------------------------------------- check

def reference_model(state: dict[str, Tensor], cfg: ModelConfig) -> ReferenceDCLM:
    """The independent plain-PyTorch model, loaded straight from the OpenLM state dict (fp32)."""
    ref = ReferenceDCLM(cfg)
    ref.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return ref.eval()


def megatron_logits(chunk, tokens: Tensor, tp_group, tp_size: int) -> Tensor:
    """Full logits [B, S, V] of a single-pipeline-stage chunk at any TP (vocab shards gathered)."""
    B, S = tokens.shape
    pos = torch.arange(S).expand(B, S)
    dev = next(chunk.parameters()).device
    with torch.no_grad():
        hidden = chunk(tokens.to(dev), pos.to(dev), None)
        h, w = chunk.loss_inputs(hidden)
        local = (h.float() @ w.float().t()).contiguous()
    if tp_size > 1:
        parts = [torch.empty_like(local) for _ in range(tp_size)]
        dist.all_gather(parts, local, group=tp_group)
        local = torch.cat(parts, dim=-1)
    return local.cpu()


def check_logits(chunks: list, state: dict[str, Tensor], cfg: ModelConfig, *, tp_group, tp_size: int,
                 pp_size: int, seed: int = 0, batch: int = 2, seq: int = 64, rtol: float = 1e-4) -> dict:
    """Logits of the megatron chunks vs the reference forward on the same random tokens.

    Returns {max_abs, rel, ok}; raises ConversionError when the relative L2 difference exceeds
    ``rtol``. Needs a single pipeline stage (pp 1): with pp > 1 compare the full tensors instead
    (:func:`check_tensors`) or convert at pp 1 and load the checkpoint at the target layout."""
    if pp_size != 1:
        raise ConversionError("the logits check runs at pipeline size 1")
    from megatron.core.utils import unwrap_model

    (chunk,) = unwrap_model(list(chunks))
    was_training = chunk.training
    chunk.eval()
    g = torch.Generator().manual_seed(seed)
    seq = min(seq, cfg.seq_length)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    got = megatron_logits(chunk, tokens, tp_group, tp_size)
    with torch.no_grad():
        want = reference_model(state, cfg)(tokens)
    chunk.train(was_training)
    rel = ((got - want).norm() / want.norm()).item()
    out = {"max_abs": (got - want).abs().max().item(), "rel": rel, "ok": rel <= rtol}
    if not out["ok"]:
        raise ConversionError(f"converted model differs from the reference forward: relative L2 "
                              f"{rel:.3e} > {rtol:g} (max abs {out['max_abs']:.3e})")
    return out


def check_tensors(full_now: dict[str, Tensor], state: dict[str, Tensor], cfg: ModelConfig) -> None:
    """The model's gathered full tensors equal the OpenLM state dict exactly (after renaming)."""
    back = to_openlm_names(full_now, cfg)
    for k, v in state.items():
        if not torch.equal(back[k], v.float()):
            raise ConversionError(f"tensor {k} differs after conversion "
                                  f"(max abs {(back[k] - v.float()).abs().max().item():.3e})")


# ---------------------------------------------------------------------------------- export

def openlm_swiglu_hidden(dim: int) -> int:
    """The SwiGLU width open_lm builds for ``dim`` (open_lm/model.py ``Block``: 8·dim/3 rounded up
    to a multiple of 256; DCLM-1B: 5632). open_lm has no setting for it, so a model of another
    width has the same keys but cannot be built by open_lm."""
    return 256 * ((int(2 * 4 * dim / 3) + 256 - 1) // 256)


def export_config(run: RunConfig) -> dict:
    """The config JSON written next to exported weights: enough to rebuild either model, with the
    open_lm model config (``open_lm_model_config``, the JSON open_lm's ``--model`` takes)."""
    m = run.model
    ffn_ok = openlm_swiglu_hidden(m.hidden_size) == m.ffn_hidden_size
    return {
        "format": "megavlm-openlm/2",
        "files": dict(OPENLM_FILES),
        "key_layout": "model.safetensors: open_lm (tok_embeddings, layers.N.attention.in_proj=[q;k;v], "
                      "attention.out_proj, attention.pos_embed.inv_freq (rotary buffer), "
                      "feed_forward.w12=[gate;up], w3, attention_norm, ffn_norm, q_norm/k_norm over "
                      "heads*head_dim, norm, output); projector.safetensors: projector.fc1/fc2 (weight, bias)",
        "open_lm_model_config": {"hidden_dim": m.hidden_size, "n_layers": m.num_layers,
                                 "n_heads": m.num_attention_heads, "seq_len": m.seq_length,
                                 "vocab_size": m.vocab_size, "post_embed_norm": False,
                                 "weight_tying": False, "model_norm": "gain_only_lp_layer_norm",
                                 "ffn_type": "swiglu_torch", "qk_norm": m.qk_norm,
                                 "positional_embedding_type": "rotary"},
        "open_lm_loadable": ffn_ok,
        **({} if ffn_ok else {"open_lm_note": f"open_lm builds SwiGLU width "
                                              f"{openlm_swiglu_hidden(m.hidden_size)} for dim {m.hidden_size}, "
                                              f"this model has {m.ffn_hidden_size}: same keys, other shapes"}),
        "architecture": {"dim": m.hidden_size, "n_layers": m.num_layers, "n_heads": m.num_attention_heads,
                         "ffn_hidden_dim": m.ffn_hidden_size, "vocab_size": m.vocab_size,
                         "seq_len": m.seq_length, "norm_eps": m.norm_eps, "norm": "gain-only LayerNorm",
                         "qk_norm": m.qk_norm, "positional_embedding": "rotary", "rope_base": m.rope_base,
                         "ffn": "swiglu", "bias": False, "tied_embeddings": False},
        "projector": {"embed_dim": m.vision.embed_dim, "num_patches": m.vision.num_patches,
                      "hidden": m.vision.projector_mult * m.vision.embed_dim, "activation": "gelu",
                      "bias": True},
        "megavlm_model_config": {k: v for k, v in run.to_dict()["model"].items()},
    }


def export_tensors(full: dict[str, Tensor], cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Tensor]:
    """OpenLM-named language model (weights in ``dtype``, plus every layer's rotary ``inv_freq``
    buffer for ``cfg.rope_base`` in fp32, as open_lm keeps it) + ``projector.*`` tensors in
    ``dtype``, all contiguous. :func:`write_export` puts the projector in its own file."""
    out = {k: v.to(dtype).contiguous() for k, v in to_openlm_names(full, cfg).items()}
    inv_freq = openlm_inv_freq(cfg.head_dim, cfg.rope_base)
    for i in range(cfg.num_layers):
        out[ROTARY_KEY.format(i=i)] = inv_freq.clone()
    for k, v in full.items():
        if k.startswith("projector."):
            out[k] = v.to(dtype).contiguous()
    return out


def write_export(tensors: dict[str, Tensor], config: dict, out_dir: str | Path,
                 metadata: Optional[dict] = None) -> Path:
    """``model.safetensors`` (everything but ``projector.*``: the open_lm state dict),
    ``projector.safetensors`` (the ``projector.*`` tensors, if any) and ``config.json`` under
    ``out_dir``; each written under a temporary name, then renamed."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    parts = {"model.safetensors": {k: v for k, v in tensors.items() if not k.startswith("projector.")},
             "projector.safetensors": {k: v for k, v in tensors.items() if k.startswith("projector.")}}
    for name, part in parts.items():
        if not part:
            continue
        tmp = out / (name + ".tmp")
        save_file(part, str(tmp), metadata=meta)
        tmp.replace(out / name)
    tmp = out / "config.json.tmp"
    tmp.write_text(json.dumps(config, indent=1))
    tmp.replace(out / "config.json")
    return out
