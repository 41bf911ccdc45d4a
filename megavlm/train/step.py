"""One microbatch through the model and the loss, in megatron's forward-step contract.

The loss is a **sum** over loss tokens. megatron's schedules (``calculate_per_token_loss``)
accumulate the token counts of every microbatch, and ``finalize_model_grads`` all-reduces the
count over data-parallel ranks and scales the gradients by 1/count — so the step's gradient is
the mean over all loss tokens of the global batch, however the tokens fall across microbatches
(with 70 % of a caption row masked, per-microbatch means would silently re-weight samples).
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from megavlm.data.batch import Batch
from megavlm.ops.masked_ce import masked_cross_entropy


def packed_attention_mask(cu_seqlens: Optional[Tensor], batch: int, seq: int,
                          device: torch.device) -> Optional[Tensor]:
    """[B, 1, S, S] bool, True where attention is forbidden: causal and within one document.
    None when rows are unpacked (megatron then applies its plain causal mask)."""
    if cu_seqlens is None:
        return None
    flat = torch.arange(batch * seq, device=device)
    doc = torch.searchsorted(cu_seqlens[1:].to(device=device, dtype=torch.int64), flat, right=True)
    doc = doc.view(batch, seq)
    causal = torch.triu(torch.ones(seq, seq, dtype=torch.bool, device=device), diagonal=1)
    return ((doc[:, :, None] != doc[:, None, :]) | causal).unsqueeze(1)


def make_forward_step(*, z_loss: float, tp_group, device: torch.device) -> Callable:
    """The ``forward_step_func`` handed to megatron's get_forward_backward_func."""
    from megatron.core.utils import unwrap_model

    def forward_step(data_iterator: Iterator[Batch], model):
        batch: Batch = next(data_iterator).to(device)
        core = unwrap_model(model)
        B, S = batch.tokens.shape
        mask = packed_attention_mask(batch.cu_seqlens, B, S, device)
        hidden = model(batch.tokens, batch.position_ids, mask, batch.image_embeds, batch.image_slots)

        def loss_func(output: Tensor):
            h, weight = core.loss_inputs(output)
            loss_sum, count = masked_cross_entropy(h, weight, batch.labels, batch.loss_mask,
                                                   z_loss=z_loss, tp_group=tp_group)
            report = torch.stack([loss_sum.detach().float(), count.detach().float()])
            return loss_sum, count.to(torch.int), {"loss": report}

        return hidden, loss_func

    return forward_step
