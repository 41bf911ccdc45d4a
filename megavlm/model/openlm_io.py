"""OpenLM / DCLM state dicts in and out of a megavlm model, at any tensor/pipeline layout.

Why: DCLM-1B and other open_lm models are published as state dicts under open_lm's parameter
names (``tok_embeddings``, ``layers.N.attention.in_proj``, ``feed_forward.w12`` …). Importing one
means renaming (megavlm.model.reference.from_openlm_names owns the names), placing each full
tensor's shard (megavlm.model.layout owns the shard arithmetic) into the parameters this rank
holds, and proving the result computes the same function as an independent implementation:
:func:`check_logits` runs the megatron model and megavlm.model.reference.ReferenceDCLM (plain
PyTorch, loaded straight from the OpenLM state dict) on the same tokens. Export is the way back: the language model under OpenLM
names plus the projector, as safetensors with a config JSON.

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


class ConversionError(ValueError):
    """A state dict that does not fit the model config, or a conversion that fails its check."""


# ---------------------------------------------------------------------------------- reading

def read_state_dict(path: str | Path) -> tuple[dict[str, Tensor], list[str]]:
    """(OpenLM-named tensors, dropped rotary buffer names) of a .pt/.bin or .safetensors file.

    Accepts a bare state dict or open_lm's training checkpoint ``{"state_dict": ...}``, strips the
    DDP / torch.compile / Hugging Face wrapper prefixes, and drops RoPE caches (recomputed here
    from ``model.rope_base``)."""
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
    out, dropped = {}, []
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
            continue
        out[stripped] = t
    return out, dropped


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

def export_config(run: RunConfig) -> dict:
    """The config JSON written next to exported weights: enough to rebuild either model."""
    m = run.model
    return {
        "format": "megavlm-openlm/1",
        "key_layout": "open_lm (tok_embeddings, layers.N.attention.in_proj=[q;k;v], "
                      "feed_forward.w12=[gate;up], w3, attention_norm, ffn_norm, q_norm/k_norm over "
                      "heads*head_dim, norm, output) + projector.fc1/fc2 (weight, bias)",
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
    """OpenLM-named language model + ``projector.*`` tensors, contiguous, in ``dtype``."""
    out = {k: v.to(dtype).contiguous() for k, v in to_openlm_names(full, cfg).items()}
    for k, v in full.items():
        if k.startswith("projector."):
            out[k] = v.to(dtype).contiguous()
    return out


def write_export(tensors: dict[str, Tensor], config: dict, out_dir: str | Path,
                 metadata: Optional[dict] = None) -> Path:
    """``model.safetensors`` + ``config.json`` under ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"),
              metadata={k: str(v) for k, v in (metadata or {}).items()})
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out
