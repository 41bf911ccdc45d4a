"""Full (unsharded) tensors of a model, keyed by global parameter name.

Gathers every parameter — or its gradient — across the tensor-parallel group (megavlm.model.layout
puts the shards back together) and across pipeline stages, renaming local layer indices to
global ones. Used by parity tests, by the independent
reference forward, and by export of the language model.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from megavlm.model import layout


def _gather_tp(t: Tensor, group, size: int) -> list[Tensor]:
    """All-gather ``t`` across ``group`` on ``t``'s own device: NCCL takes CUDA tensors only, so the
    shards must reach the collective where the parameter lives, and move to the host after."""
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def full_tensors(chunks: Iterable[torch.nn.Module], *, tp_group=None, pp_group=None,
                 grads: bool = False) -> dict[str, Tensor]:
    """{global name: full fp32 tensor} on every rank (``grads``: megatron DDP's main_grad)."""
    from megatron.core.utils import unwrap_model

    tp = dist.get_world_size(tp_group) if tp_group is not None else 1
    out: dict[str, Tensor] = {}
    for chunk in unwrap_model(list(chunks)):
        numbers = layout.chunk_layer_numbers(chunk)
        for local, p in chunk.named_parameters():
            name = layout.global_name(local, numbers)
            if grads:
                t = getattr(p, "main_grad", None)
                if t is None:
                    t = p.grad if p.grad is not None else torch.zeros_like(p)
            else:
                t = p.data
            layout.check_parameter(name, p)
            if tp > 1 and layout.placement(name).dim is not None:
                # gathered on the parameter's device (NCCL refuses host tensors), in its dtype
                t = layout.unshard(name, _gather_tp(t.detach(), tp_group, tp))
            # a host fp32 snapshot, never a view of a live buffer
            out[name] = t.detach().float().cpu().clone()
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        gathered: list[Optional[dict]] = [None] * dist.get_world_size(pp_group)
        dist.all_gather_object(gathered, out, group=pp_group)
        merged: dict[str, Tensor] = {}
        for part in gathered:
            merged.update(part)
        out = merged
    return out
