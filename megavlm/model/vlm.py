"""The megavlm model: a DCLM decoder that reads image embeddings in their slots.

One pipeline chunk of the model. The first chunk embeds tokens and, when the microbatch has
images, projects their stored patch embeddings and splices them into their slots (image first,
then the separator token, then text); text-only rows take the same path with nothing spliced.
The last chunk ends with the final norm and returns hidden states — the loss (megavlm.ops)
computes logits only where the loss mask is 1, using :meth:`VLM.loss_inputs`.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.enums import ModelType
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from megavlm.config import ModelConfig
from megavlm.model.attention import KVCache, KVCacheError, cache_seats
from megavlm.model.projector import Projector
from megavlm.model.specs import Backend, block_spec


def rotary_embedding(position_ids: Tensor, head_dim: int, base: float) -> Tensor:
    """Rotary angles for explicit positions: [B, S] → [S, B, 1, head_dim] (megatron's non-interleaved
    layout: the angle vector repeated twice). Positions restart per packed document.

    Packed rows come flattened to [1, T]: the angles are then [T, 1, 1, head_dim], one per
    position of the whole packed sequence, and megatron's THD rotary (rope_utils, "freqs for the
    whole packed batch") takes each document's slice at its offset — exactly these explicit
    positions, as for unpacked rows."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32,
                                            device=position_ids.device) / head_dim))
    freqs = position_ids.t().float().unsqueeze(-1) * inv_freq  # [S, B, head_dim/2]
    return torch.cat((freqs, freqs), dim=-1).unsqueeze(2)


def splice_images(embeddings: Tensor, projected: Tensor, image_slots: Tensor) -> Tensor:
    """Place projected images [N, P, d] into embeddings [S, B, d] at (row, start) slots."""
    n, p, d = projected.shape
    offsets = torch.arange(p, device=embeddings.device)
    seq_idx = (image_slots[:, 1:2] + offsets).reshape(-1)
    row_idx = image_slots[:, 0:1].expand(n, p).reshape(-1)
    if seq_idx.numel() and int(seq_idx.max()) >= embeddings.shape[0]:
        raise ValueError(f"an image slot runs past the sequence ({int(seq_idx.max())} >= {embeddings.shape[0]})")
    return embeddings.index_put((seq_idx, row_idx), projected.reshape(-1, d).to(embeddings.dtype))


class VLM(MegatronModule):
    """One (virtual) pipeline chunk of the vision-language model."""

    def __init__(self, config: TransformerConfig, model: ModelConfig, *, pre_process: bool,
                 post_process: bool, vp_stage: Optional[int] = None, backend: Backend = "local"):
        super().__init__(config=config)
        self.model_type = ModelType.encoder_or_decoder
        self.share_embeddings_and_output_weights = False  # DCLM: untied
        self.model_cfg = model
        self.pre_process = pre_process
        self.post_process = post_process
        self.vp_stage = vp_stage
        if pre_process:
            self.embedding = LanguageModelEmbedding(config, model.vocab_size, model.seq_length,
                                                    position_embedding_type="rope",
                                                    scatter_to_sequence_parallel=False)
            self.projector = Projector(config, model.vision)
        n_here = get_num_layers_to_build(config, vp_stage=vp_stage)
        self.decoder = TransformerBlock(config, block_spec(n_here, model.qk_norm, backend),
                                        pre_process=pre_process, post_process=post_process,
                                        vp_stage=vp_stage)
        if post_process:
            self.output_layer = ColumnParallelLinear(
                model.hidden_size, model.vocab_size, config=config, init_method=lambda w: None,
                bias=False, gather_output=False, skip_bias_add=True)

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline stages after the first receive their input from the previous stage."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def forward(self, tokens: Tensor, position_ids: Tensor,
                packed_seq_params: Optional[PackedSeqParams] = None,
                image_embeds: Optional[Tensor] = None, image_slots: Optional[Tensor] = None,
                kv_cache: Optional[KVCache] = None) -> Tensor:
        """Returns hidden states [S, B, d] (sequence-parallel split when enabled); on the last
        chunk they are final-normed.

        Unpacked rows: ``tokens``/``position_ids`` [B, S], causal attention, no packed params.
        Packed rows: flattened to [1, T] with ``packed_seq_params`` their document boundaries
        (megavlm.model.attention.document_boundaries; megavlm.train.step builds both) —
        attention stays inside each document and no mask exists. Image slots address
        (row, start) of the layout given.

        ``kv_cache`` (generation, megavlm.eval.runner): every layer's SDPAttention reads and writes
        it for this call — the right-padded prompt after ``kv_cache.prefill``, one token per row
        at the positions ``kv_cache.decode`` returned after that (megavlm.model.attention.KVCache).
        Not with packed rows or sequence parallelism (a one-token step cannot be split)."""
        if packed_seq_params is not None and tokens.shape[0] != 1:
            raise ValueError(f"packed rows come flattened to one sequence [1, T] (thd); got tokens "
                             f"of shape {tuple(tokens.shape)} with packed_seq_params")
        if kv_cache is not None and (packed_seq_params is not None or self.config.sequence_parallel):
            raise KVCacheError("the KV cache serves unpacked rows without sequence parallelism")
        hidden = None
        if self.pre_process:
            hidden = self.embedding(input_ids=tokens, position_ids=None)  # [S, B, d]
            if image_embeds is not None and image_embeds.shape[0]:
                hidden = splice_images(hidden, self.projector(image_embeds), image_slots)
            if self.config.sequence_parallel:
                hidden = tensor_parallel.scatter_to_sequence_parallel_region(hidden)
        rope = rotary_embedding(position_ids, self.model_cfg.head_dim, self.model_cfg.rope_base)
        if kv_cache is None:
            return self.decoder(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rope,
                                packed_seq_params=packed_seq_params)
        with kv_cache.attached(cache_seats(self.decoder)):
            return self.decoder(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rope)

    def logits(self, hidden: Tensor) -> Tensor:
        """Full logits [B, S, V] from final hidden states, for inference on one process
        (training never materialises them: see megavlm.ops.masked_ce)."""
        return hidden.transpose(0, 1) @ self.output_layer.weight.t()

    def loss_inputs(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """(hidden [B, S, d] replicated over TP with a TP-reducing backward, output weight shard)."""
        if self.config.sequence_parallel:
            hidden = tensor_parallel.gather_from_sequence_parallel_region(
                hidden, tensor_parallel_output_grad=True)
        else:
            hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden)
        return hidden.transpose(0, 1), self.output_layer.weight

