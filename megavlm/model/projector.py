"""The vision projector: Linear(d_v, m·d_v) → GELU → Linear(m·d_v, d_model), tensor-parallel.

The frozen encoder's patch embeddings are precomputed; this two-layer MLP (Prismatic's
``gelu-mlp``, the paper's appendix B) is the only vision part that trains. The first linear is
column-parallel and the second row-parallel, so the hidden activation stays split across the
tensor-parallel group and one all-reduce returns a replicated output.
"""

from __future__ import annotations

import dataclasses

import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from megavlm.config import VisionConfig


class Projector(MegatronModule):
    def __init__(self, config: TransformerConfig, vision: VisionConfig):
        # Images are not a sequence: under sequence parallelism megatron's parallel linears would
        # gather/scatter along their first dim (here: images), so the projector never uses it.
        config = dataclasses.replace(config, sequence_parallel=False)
        super().__init__(config=config)
        hidden = vision.projector_mult * vision.embed_dim
        self.embed_dim = vision.embed_dim
        noinit = lambda w: None  # noqa: E731  (megavlm.model.init sets the weights)
        self.fc1 = ColumnParallelLinear(vision.embed_dim, hidden, config=config, init_method=noinit,
                                        bias=True, gather_output=False, skip_bias_add=False)
        self.fc2 = RowParallelLinear(hidden, config.hidden_size, config=config, init_method=noinit,
                                     bias=True, input_is_parallel=True, skip_bias_add=False)

    def forward(self, image_embeds: Tensor) -> Tensor:
        """[N, P, d_v] (any float dtype) → [N, P, d_model] in the parameters' dtype."""
        if image_embeds.shape[-1] != self.embed_dim:
            raise ValueError(f"image embeddings have width {image_embeds.shape[-1]}, "
                             f"the projector expects {self.embed_dim}")
        x = image_embeds.to(self.fc1.weight.dtype)
        x, _ = self.fc1(x)
        x = F.gelu(x)
        x, _ = self.fc2(x)
        return x
