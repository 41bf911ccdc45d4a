"""Sample and Batch: the contract between the data pipeline and the model.

A caption sample is ``[P image positions][SEP][caption tokens][EOD]``; a conversation sample is
the same with turns; a text sample is tokens only. Image positions hold the tokenizer's image
placeholder id and never carry loss. A sample is stored as a token sequence of length L plus a
per-token *target* mask: ``target[i]`` says whether token i may be predicted (is a loss target).
A sample of n tokens fills n positions of a row; position i predicts token i+1 of the same
sample with loss ``target[i+1]`` — so the SEP position predicts the first caption token, no
position ever predicts an image placeholder, and nothing is predicted across documents.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import numpy as np
import torch


def image_head(ids, num_patches: int) -> np.ndarray:
    """The head of every image sample, ``[P x IMAGE][SEP]`` (int64, P + 1 ids): the one definition
    used by the sources, the evaluation's prompts, the benchmarks and the synthetic test data.
    ``ids`` is a Tokenizer or a SpecialIds (anything with ``image`` and ``sep``). Never a target."""
    if num_patches < 1:
        raise ValueError(f"an image takes at least one position, not num_patches={num_patches}")
    head = np.full(num_patches + 1, ids.image, dtype=np.int64)
    head[-1] = ids.sep
    return head


@dataclass(frozen=True)
class Sample:
    """One document before collation (length L = positions + 1 for the shifted label)."""

    tokens: np.ndarray
    """int64 token ids, image positions hold the image placeholder id."""
    target: np.ndarray
    """bool, True where the token is a loss target (never for image positions)."""
    image: Optional[np.ndarray] = None
    """[P, D_v] stored (uint16-bit-pattern or float) embeddings of the image, if any."""
    image_start: int = 0
    """Index in ``tokens`` of the first image position."""
    source: str = "text"
    """Which kind of source produced it: text, captions or instructions."""

    def __post_init__(self):
        if self.tokens.shape != self.target.shape:
            raise ValueError(f"sample tokens {self.tokens.shape} and target {self.target.shape} differ")


@dataclass(frozen=True)
class Batch:
    """What every model needs for one microbatch, nothing else. Tensors are on the CPU until moved."""

    tokens: torch.Tensor
    """[B, S] int64 input ids (image positions hold the placeholder id)."""
    labels: torch.Tensor
    """[B, S] int64 next-token ids."""
    loss_mask: torch.Tensor
    """[B, S] float32, 1 where the position's prediction is trained."""
    position_ids: torch.Tensor
    """[B, S] int64, restarting at 0 for each packed sample (a stage with ``text_attention:
    window`` joins a row's text into one sample: its positions run through the documents)."""
    image_embeds: Optional[torch.Tensor] = None
    """[N, P, D_v] image patch embeddings in the stored 16-bit dtype (bf16/fp16), or None."""
    image_slots: Optional[torch.Tensor] = None
    """[N, 2] int64 (row, start): image n occupies tokens[row, start:start+P]."""
    cu_seqlens: Optional[torch.Tensor] = None
    """[D+1] int32 cumulative document boundaries over the flattened B*S positions (packing),
    every row boundary is also a document boundary; None = one document per row."""

    def __post_init__(self):
        B, S = self.tokens.shape
        for name in ("labels", "loss_mask", "position_ids"):
            t = getattr(self, name)
            if t.shape != (B, S):
                raise ValueError(f"Batch.{name} has shape {tuple(t.shape)}, tokens {(B, S)}")
        if (self.image_embeds is None) != (self.image_slots is None):
            raise ValueError("Batch.image_embeds and Batch.image_slots go together")
        if self.image_embeds is not None and self.image_embeds.shape[0] != self.image_slots.shape[0]:
            raise ValueError(f"{self.image_embeds.shape[0]} images but {self.image_slots.shape[0]} slots")

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum().item())

    def to(self, device: torch.device | str) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return replace(self, tokens=move(self.tokens), labels=move(self.labels),
                       loss_mask=move(self.loss_mask), position_ids=move(self.position_ids),
                       image_embeds=move(self.image_embeds), image_slots=move(self.image_slots),
                       cu_seqlens=move(self.cu_seqlens))

    def image_position_mask(self, num_patches: int) -> torch.Tensor:
        """[B, S] bool, True at positions that hold an image patch."""
        mask = torch.zeros_like(self.tokens, dtype=torch.bool)
        if self.image_slots is not None:
            for row, start in self.image_slots.tolist():
                mask[row, start:start + num_patches] = True
        return mask


def collate(rows: Sequence[Sequence[Sample]], seq_length: int, pad_id: int,
            embed_dtype: torch.dtype = torch.bfloat16) -> Batch:
    """Pack lists of samples into a Batch: each inner list fills one row of ``seq_length`` positions.

    A sample of n tokens occupies n positions and makes n-1 predictions inside itself (its last
    token predicts nothing), so a packed document is trained exactly as it would be alone:
    attention and position ids restart at its first position. Rows are padded with ``pad_id``
    (no loss) to ``seq_length``; a row's samples must fit in it.
    """
    B = len(rows)
    tokens = np.full((B, seq_length), pad_id, dtype=np.int64)
    labels = np.full((B, seq_length), pad_id, dtype=np.int64)
    mask = np.zeros((B, seq_length), dtype=np.float32)
    pos = np.zeros((B, seq_length), dtype=np.int64)
    bounds = [0]
    images, slots = [], []
    packed = False
    for r, samples in enumerate(rows):
        off = 0
        packed |= len(samples) > 1
        for i, s in enumerate(samples):
            n = len(s.tokens)
            if off + n > seq_length:
                raise ValueError(f"row {r}: sample {i} ({s.source}, {n} tokens) does not fit: "
                                 f"{off + n} positions > seq_length {seq_length}")
            tokens[r, off:off + n] = s.tokens
            labels[r, off:off + n - 1] = s.tokens[1:]
            mask[r, off:off + n - 1] = s.target[1:]
            pos[r, off:off + n] = np.arange(n)
            if s.image is not None:
                images.append(s.image)
                slots.append((r, off + s.image_start))
            off += n
            bounds.append(r * seq_length + off)
        if off < seq_length:
            pos[r, off:] = np.arange(seq_length - off)
            bounds.append((r + 1) * seq_length)
            packed |= bool(samples)
    image_embeds = image_slots = None
    if images:
        arr = np.stack(images)
        t = torch.from_numpy(arr)
        if arr.dtype == np.uint16:  # 16-bit bit pattern from the store
            t = t.view(embed_dtype)
        image_embeds = t
        image_slots = torch.tensor(slots, dtype=torch.int64)
    return Batch(
        tokens=torch.from_numpy(tokens),
        labels=torch.from_numpy(labels),
        loss_mask=torch.from_numpy(mask),
        position_ids=torch.from_numpy(pos),
        image_embeds=image_embeds,
        image_slots=image_slots,
        cu_seqlens=torch.tensor(bounds, dtype=torch.int32) if packed else None,
    )
