"""One microbatch through the model and the loss, in megatron's forward-step contract.

The loss is a **sum** over loss tokens. megatron's schedules (``calculate_per_token_loss``)
accumulate the token counts of every microbatch, and ``finalize_model_grads`` all-reduces the
count over data-parallel ranks and scales the gradients by 1/count — so the step's gradient is
the mean over all loss tokens of the global batch, however the tokens fall across microbatches
(with 70 % of a caption row masked, per-microbatch means would silently re-weight samples).

Packed rows reach the model as document boundaries, never as a mask: the B rows of a packed
microbatch are flattened into one sequence of B·S positions (megatron's ``thd`` layout, which is
what TE's fused attention takes and what makes micro-batch > 1 work there) with ``cu_seqlens``
over all documents of all rows; unpacked rows stay [S, B] on the causal fast path. Under pipeline
parallelism every microbatch must have the same activation shape on the wire, so there unpacked
microbatches are flattened too, with one document per row (:class:`StepLayout`). Everything the
layout needs is computed on the host before the batch moves, so the step never waits on the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from torch import Tensor

from megavlm.data.batch import Batch
from megavlm.model.attention import document_boundaries
from megavlm.ops.masked_ce import masked_cross_entropy


@dataclass(frozen=True)
class StepLayout:
    """The shape a stage's microbatches have on their way to the model."""

    seq_length: int
    """Positions per row (the stage's seq_length)."""
    micro_batch_size: int
    """Rows per microbatch."""
    pipelined: bool = False
    """Pipeline parallel: activations cross stages, so every microbatch takes one layout."""

    @property
    def flatten_always(self) -> bool:
        """Unpacked microbatches are flattened too (one document per row), so that they have the
        packed microbatches' shape [B·S, 1, d] between pipeline stages."""
        return self.pipelined and self.micro_batch_size > 1

    @property
    def p2p_shape(self) -> tuple[int, int]:
        """(seq_length, micro_batch_size) as megatron's schedules size their p2p tensors
        (seq_length × micro_batch_size × hidden)."""
        if self.flatten_always:
            return self.seq_length * self.micro_batch_size, 1
        return self.seq_length, self.micro_batch_size

    def check(self, batch: Batch) -> None:
        B, S = batch.tokens.shape
        if S != self.seq_length:
            raise ValueError(f"a microbatch has rows of {S} positions, but this stage's seq_length "
                             f"is {self.seq_length}")
        if self.pipelined and B != self.micro_batch_size:
            raise ValueError(f"a microbatch has {B} rows, but pipeline stages exchange "
                             f"micro_batch_size={self.micro_batch_size} rows")


@dataclass(frozen=True)
class ModelInputs:
    """What VLM.forward and the loss read for one microbatch, in the layout attention gets."""

    tokens: Tensor
    """[B, S], or [1, B·S] when packed."""
    position_ids: Tensor
    labels: Tensor
    loss_mask: Tensor
    image_embeds: Optional[Tensor]
    image_slots: Optional[Tensor]
    """(row, start) in ``tokens``' layout: (0, row·S + start) when packed."""
    packed_seq_params: Optional[PackedSeqParams]
    """Document boundaries over the flattened rows (megavlm.model.attention), None when unpacked."""


def model_inputs(batch: Batch, device: torch.device | str, *, flatten_unpacked: bool = False) -> ModelInputs:
    """The model's inputs of a (host) batch, moved to ``device``. Packed rows — and unpacked rows
    when ``flatten_unpacked`` — are flattened with their document boundaries; boundaries that do
    not fit the rows are refused (megavlm.model.attention.check_boundaries)."""
    B, S = batch.tokens.shape
    move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
    cu = batch.cu_seqlens
    if cu is None and not flatten_unpacked:
        return ModelInputs(move(batch.tokens), move(batch.position_ids), move(batch.labels),
                           move(batch.loss_mask), move(batch.image_embeds), move(batch.image_slots),
                           None)
    if cu is None:
        cu = torch.arange(0, B * S + 1, S, dtype=torch.int32)
    params = document_boundaries(cu, B * S, device, row_length=S)
    flat = lambda t: move(t.reshape(1, B * S))  # noqa: E731
    slots = batch.image_slots
    if slots is not None:
        slots = torch.stack([torch.zeros_like(slots[:, 0]), slots[:, 0] * S + slots[:, 1]], dim=1)
    return ModelInputs(flat(batch.tokens), flat(batch.position_ids), flat(batch.labels),
                       flat(batch.loss_mask), move(batch.image_embeds), move(slots), params)


def make_forward_step(*, z_loss: float, tp_group, device: torch.device,
                      layout: Optional[StepLayout] = None) -> Callable:
    """The ``forward_step_func`` handed to megatron's get_forward_backward_func. ``layout`` (the
    stage's) checks each microbatch's shape and decides whether unpacked rows are flattened."""
    from megatron.core.utils import unwrap_model

    flatten = layout is not None and layout.flatten_always

    def forward_step(data_iterator: Iterator[Batch], model):
        batch: Batch = next(data_iterator)
        if layout is not None:
            layout.check(batch)
        x = model_inputs(batch, device, flatten_unpacked=flatten)
        core = unwrap_model(model)
        hidden = model(x.tokens, x.position_ids, x.packed_seq_params, x.image_embeds, x.image_slots)

        def loss_func(output: Tensor):
            h, weight = core.loss_inputs(output)
            loss_sum, count = masked_cross_entropy(h, weight, x.labels, x.loss_mask,
                                                   z_loss=z_loss, tp_group=tp_group)
            report = torch.stack([loss_sum.detach().float(), count.detach().float()])
            return loss_sum, count.to(torch.int), {"loss": report}

        return hidden, loss_func

    return forward_step
