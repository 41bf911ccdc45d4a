"""Full (unsharded) tensors of a model, keyed by global parameter name.

Gathers every parameter — or its gradient — across the tensor-parallel group (undoing megatron's
shard layouts, including the GLU fc1 whose shard is [gate shard; up shard]) and across pipeline
stages, renaming local layer indices to global ones. Used by parity tests, by the independent
reference forward, and by export of the language model.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def _gather_tp(t: Tensor, dim: int, group, size: int) -> Tensor:
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def full_tensors(chunks: Iterable[torch.nn.Module], *, tp_group=None, pp_group=None,
                 grads: bool = False) -> dict[str, Tensor]:
    """{global name: full fp32 tensor} on every rank (``grads``: megatron DDP's main_grad)."""
    from megatron.core.utils import unwrap_model

    tp = dist.get_world_size(tp_group) if tp_group is not None else 1
    out: dict[str, Tensor] = {}
    for chunk in unwrap_model(list(chunks)):
        layers = {str(i): l.layer_number - 1 for i, l in enumerate(chunk.decoder.layers)}
        for name, p in chunk.named_parameters():
            if grads:
                t = getattr(p, "main_grad", None)
                if t is None:
                    t = p.grad if p.grad is not None else torch.zeros_like(p)
            else:
                t = p.data
            t = t.detach().float().cpu().clone()  # a snapshot, never a view of a live buffer
            if tp > 1 and getattr(p, "tensor_model_parallel", False):
                dim = p.partition_dim
                if name.endswith("mlp.linear_fc1.weight"):
                    gate, up = t.chunk(2, dim=0)
                    t = torch.cat([_gather_tp(gate, 0, tp_group, tp), _gather_tp(up, 0, tp_group, tp)])
                else:
                    t = _gather_tp(t, dim, tp_group, tp)
            m = _LAYER.match(name)
            if m:
                name = f"decoder.layers.{layers[m.group(1)]}." + name[m.end():]
            out[name] = t
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        gathered: list[Optional[dict]] = [None] * dist.get_world_size(pp_group)
        dist.all_gather_object(gathered, out, group=pp_group)
        merged: dict[str, Tensor] = {}
        for part in gathered:
            merged.update(part)
        out = merged
    return out
