"""Core attention of the local layer spec, and the document boundaries it and TE's attention read.

Why it exists: every training row is packed with several documents. megatron-core's own
``DotProductAttention`` only knows dense masks, so packed rows would cost a [B, H, S, S] score
tensor per layer (2 GiB of fp32 at the DCLM-1B recipe, kept for backward). Here packed rows
reach attention as **document boundaries** — megatron's ``PackedSeqParams`` in the ``thd``
layout, the same object Transformer Engine's fused attention takes — and :class:`SDPAttention`
attends causally inside each document with PyTorch's ``scaled_dot_product_attention`` (the
fused CPU kernel on CPU, flash / memory-efficient kernels on CUDA, PyTorch's varlen flash
attention on CUDA for 16-bit inputs), never building an S×S mask.

The layout contract (megavlm.train.step builds it):

* unpacked rows: query/key/value ``[S, B, heads, head_dim]``, causal, no ``packed_seq_params``;
* packed rows: the B rows flattened into one sequence of T = B·S positions, query/key/value
  ``[T, heads, head_dim]`` (megatron squeezes the batch dim of 1 for ``thd``), and
  :func:`document_boundaries` giving ``cu_seqlens`` over all documents of all rows (a row's end
  padding is a document of its own that nothing else attends to).

``cu_seqlens_q/kv`` live on the model's device (TE reads them there); the same values are kept
on the host in ``cu_seqlens_q/kv_padded`` (no padding sits between our documents, so the padded
offsets equal the plain ones). megatron's THD rotary (rope_utils._apply_rotary_pos_emb_thd)
reads the ``*_padded`` offsets first and calls ``.item()`` on them once per document, and this
module needs the document lengths as Python ints: both read the host copy, so no step
synchronises with the GPU. The TE seat (megavlm.model.te_spec) hands TE the params without the
host copy (:func:`for_device_kernels`).

Tensor and sequence parallel need nothing here: under TP the query/key/value hold this rank's
heads; under SP megatron's column-parallel QKV projection all-gathers the sequence first, so
attention always sees whole documents.

Generation reaches the same seat with a :class:`KVCache` (megavlm.eval.runner holds it, VLM.forward
attaches it for one call): the prompt forward stores every layer's keys/values, then each step
runs one token per row and attends over the cache. A cache of our own rather than megatron's
inference contexts: megatron's static batching keeps one sequence offset for the whole batch and
re-slices the rotary table by it, which fits neither right-padded rows of different lengths nor
our explicit per-row positions, and its padded rows need a dense mask this seat refuses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor


class BoundaryError(ValueError):
    """Document boundaries that do not describe the sequence they come with."""


def check_boundaries(cu_seqlens: Tensor, total: int, row_length: Optional[int] = None) -> list[int]:
    """The boundaries as Python ints, after checking them: 1-D, from 0 to ``total`` (the
    flattened positions), strictly increasing, and — given ``row_length`` — with every row end a
    boundary (no document crosses rows, so none is longer than a row)."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise BoundaryError(f"cu_seqlens must be 1-D with at least 2 entries, got shape "
                            f"{tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype.is_floating_point:
        raise BoundaryError(f"cu_seqlens must be integers, got {cu_seqlens.dtype}")
    b = cu_seqlens.tolist()
    if b[0] != 0:
        raise BoundaryError(f"cu_seqlens must start at 0, got {b[0]}")
    if b[-1] != total:
        raise BoundaryError(f"cu_seqlens ends at {b[-1]}, but the rows hold {total} positions "
                            f"(cu_seqlens must end at the row length)")
    for i, (a, c) in enumerate(zip(b, b[1:])):
        if c <= a:
            raise BoundaryError(f"cu_seqlens must increase strictly: entry {i + 1} is {c} after {a}")
    if row_length is not None:
        missing = sorted(set(range(row_length, total, row_length)) - set(b))
        if missing:
            r = missing[0] // row_length
            raise BoundaryError(f"cu_seqlens has no boundary at the end of row {r - 1} (position "
                                f"{missing[0]}): a document would run across rows of "
                                f"seq_length {row_length}")
    return b


def document_boundaries(cu_seqlens: Tensor, total: int, device: torch.device | str,
                        row_length: Optional[int] = None) -> PackedSeqParams:
    """megatron ``PackedSeqParams`` (``thd``) for documents ``cu_seqlens`` over ``total`` flattened
    positions: int32 offsets on ``device`` plus their host copy in the ``*_padded`` fields (see the
    module docstring), and the longest document. Checked as :func:`check_boundaries` says."""
    host = cu_seqlens.detach().to("cpu", torch.int32)
    b = check_boundaries(host, total, row_length)
    longest = max(c - a for a, c in zip(b, b[1:]))
    on_device = host.to(device)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=on_device, cu_seqlens_kv=on_device,
                           cu_seqlens_q_padded=host, cu_seqlens_kv_padded=host,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def host_boundaries(params: PackedSeqParams) -> list[int]:
    """The document offsets as Python ints, from the host copy when there is one (no device sync)."""
    for t in (params.cu_seqlens_q_padded, params.cu_seqlens_q):
        if t is not None and t.device.type == "cpu":
            return t.tolist()
    return params.cu_seqlens_q.tolist()


def for_device_kernels(params: PackedSeqParams) -> PackedSeqParams:
    """The params without their host copy, for kernels that read every offset tensor on the device
    (TE's fused attention): with no padding between documents, absent ``*_padded`` offsets mean
    the same as the plain ones."""
    return dataclasses.replace(params, cu_seqlens_q_padded=None, cu_seqlens_kv_padded=None)


class VarlenUnavailable(RuntimeError):
    """torch's varlen flash attention cannot serve this call (torch too old, no CUDA, GPU < sm80)."""


VARLEN_MIN_TORCH = "2.11"
"""``varlen_attn`` exists from torch 2.9, but its ``scale`` and ``window_size`` keywords (the window
is what makes it causal) only from 2.11; 2.9/2.10 take ``is_causal`` instead."""


def _varlen_function():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def varlen_unavailable(fn, device_type: str, capability: Optional[tuple[int, int]] = None) -> Optional[str]:
    """Why ``fn`` (torch's ``varlen_attn``, or None where this torch has none) cannot run packed
    rows on a ``device_type`` device of compute ``capability``; None when it can."""
    version = torch.__version__
    if fn is None:
        return (f"torch {version} has no torch.nn.attention.varlen.varlen_attn "
                f"(needs torch >= {VARLEN_MIN_TORCH})")
    params = inspect.signature(fn).parameters
    missing = [k for k in ("scale", "window_size") if k not in params]
    if missing:
        return (f"torch {version}'s varlen_attn takes no {' / '.join(missing)} keyword "
                f"(megavlm calls it as torch >= {VARLEN_MIN_TORCH} does)")
    if device_type != "cuda":
        return f"varlen flash attention runs on CUDA, not {device_type}"
    if capability is not None and tuple(capability) < (8, 0):
        return (f"varlen flash attention needs a GPU of compute capability 8.0 or newer (sm80+), "
                f"this one is sm{capability[0]}{capability[1]}")
    return None


@functools.lru_cache(maxsize=16)
def _varlen_for(device_type: str, index: Optional[int]) -> tuple[object, Optional[str]]:
    fn = _varlen_function()
    cap = torch.cuda.get_device_capability(index) if device_type == "cuda" and fn is not None else None
    return fn, varlen_unavailable(fn, device_type, cap)


def varlen_documents(fn, query: Tensor, key: Tensor, value: Tensor, params: PackedSeqParams,
                     scale: float, causal: bool) -> Tensor:
    """One call of torch's varlen flash attention over every document of a [T, heads, D] sequence.
    The window is a *tuple*: (-1, 0) is causal (no key after the query), (-1, -1) unmasked."""
    cu = params.cu_seqlens_q.to(device=query.device, dtype=torch.int32)
    return fn(query, key, value, cu, cu, params.max_seqlen_q, params.max_seqlen_kv, scale=scale,
              window_size=(-1, 0) if causal else (-1, -1))


class SDPAttention(MegatronModule):
    """The core-attention seat on torch SDPA: causal rows batched, packed rows per document.

    Same constructor and forward signature as megatron-core's ``DotProductAttention``
    (megatron/core/transformer/dot_product_attention.py), so it fills that seat of a
    ``SelfAttention`` spec. Returns ``[S, B, heads·head_dim]`` for unpacked rows and
    ``[T, heads·head_dim]`` for packed ones (megatron reshapes the latter to ``[T, 1, ·]``).
    """

    use_varlen: bool | str = True
    """On CUDA with 16-bit inputs, packed rows go through torch's varlen flash attention where it can
    serve (:func:`varlen_unavailable`: torch >= 2.11, sm80+); otherwise (and always on CPU) SDPA
    runs per group of equal-length documents. ``"require"``: raise :class:`VarlenUnavailable`,
    naming the reason (e.g. the torch version), instead of that fallback."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str = "self", attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not implement context parallelism "
                             f"(context_parallel_size={config.context_parallel_size})")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"SDPAttention has no attention dropout (DCLM uses none); got "
                             f"attention_dropout={dropout}")
        if attention_type != "self":
            raise ValueError(f"SDPAttention is self-attention only, got attention_type={attention_type!r}")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = (1.0 / math.sqrt(config.kv_channels) if softmax_scale is None
                              else softmax_scale)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        """Nothing to checkpoint: no parameters, and (like megatron's DotProductAttention,
        dot_product_attention.py:253, and TE's core attention) no extra state in the sharded dict."""
        return {}

    # ------------------------------------------------------------------------------------ seams

    kv_cache: Optional[KVCache] = None
    """Set by :meth:`KVCache.attached` for one generation forward; None in training."""

    def keys_values(self, key: Tensor, value: Tensor, packed_seq_params: Optional[PackedSeqParams]
                    ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """The keys and values this call attends over, and their key mask (None: causal over the
        call's own). In training, and for a prompt forward, those of the call itself; a decode
        step gets the cached ones (:class:`KVCache`)."""
        if self.kv_cache is None:
            return key, value, None
        if packed_seq_params is not None:
            raise KVCacheError("the KV cache serves unpacked rows, not packed (thd) ones")
        return self.kv_cache.update(self.layer_number, key, value)

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
        """[N, heads, L, D] attention; SDPA picks its fused kernel for the device."""
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=self.softmax_scale,
                                              enable_gqa=k.shape[1] != q.shape[1])

    # ----------------------------------------------------------------------------------- forward

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                attn_mask_type: Optional[AttnMaskType] = None, attention_bias: Optional[Tensor] = None,
                packed_seq_params: Optional[PackedSeqParams] = None) -> Tensor:
        if attention_mask is not None:
            raise ValueError("SDPAttention takes document boundaries (packed_seq_params), not a "
                             f"dense attention mask (got one of shape {tuple(attention_mask.shape)})")
        if attention_bias is not None:
            raise ValueError("SDPAttention does not take an attention bias")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        if mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal, AttnMaskType.no_mask):
            raise ValueError(f"SDPAttention supports causal and unmasked attention, not {mask_type}")
        causal = mask_type != AttnMaskType.no_mask
        key, value, key_mask = self.keys_values(key, value, packed_seq_params)
        if key_mask is not None:  # a decode step: [1, B] queries over the cached [B, heads, span, D]
            S, B = query.shape[:2]
            q = query.permute(1, 2, 0, 3)
            out = F.scaled_dot_product_attention(q, key, value, attn_mask=key_mask, scale=self.softmax_scale,
                                                 enable_gqa=key.shape[1] != q.shape[1])
            return out.permute(2, 0, 1, 3).reshape(S, B, -1)
        if packed_seq_params is None:
            S, B = query.shape[:2]
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [B, heads, S, D]
            out = self._sdpa(q, k, v, causal)
            return out.permute(2, 0, 1, 3).reshape(S, B, -1)
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"SDPAttention reads packed rows in the thd layout, got "
                             f"qkv_format={packed_seq_params.qkv_format!r}")
        if query.dim() != 3:
            raise ValueError(f"packed (thd) query must be [T, heads, head_dim], got {tuple(query.shape)}")
        return self._documents(query, key, value, packed_seq_params, causal).flatten(1)

    def _documents(self, query: Tensor, key: Tensor, value: Tensor, params: PackedSeqParams,
                   causal: bool) -> Tensor:
        """Attention inside each document of a [T, heads, D] sequence, exactly, no S×S mask."""
        T = query.shape[0]
        if self.use_varlen:
            fn, why = _varlen_for(query.device.type, query.device.index)
            if why is None and query.dtype not in (torch.float16, torch.bfloat16):
                why = f"varlen flash attention takes 16-bit inputs, not {query.dtype}"
            if why is None and key.shape[1] != query.shape[1]:
                why = "varlen flash attention is called without grouped-query heads here"
            if why is None:
                return varlen_documents(fn, query, key, value, params, self.softmax_scale, causal)
            if self.use_varlen == "require":
                raise VarlenUnavailable(why)
        bounds = host_boundaries(params)
        if bounds[-1] != T:
            raise BoundaryError(f"cu_seqlens ends at {bounds[-1]} but the sequence has {T} positions")
        # documents of equal length run as one SDPA call: the loop is over distinct lengths
        groups: dict[int, list[int]] = {}
        for d, (a, b) in enumerate(zip(bounds, bounds[1:])):
            groups.setdefault(b - a, []).append(d)
        pieces: list[Optional[Tensor]] = [None] * (len(bounds) - 1)
        for L, docs in groups.items():
            n, s0 = len(docs), bounds[docs[0]]
            consecutive = docs[-1] - docs[0] == n - 1  # one contiguous stretch: views, no copy

            def take(t: Tensor) -> Tensor:  # [n, L, heads, D]
                if consecutive:
                    return t.narrow(0, s0, n * L).unflatten(0, (n, L))
                return torch.stack([t.narrow(0, bounds[d], L) for d in docs])

            q, k, v = (take(t).transpose(1, 2) for t in (query, key, value))
            out = self._sdpa(q, k, v, causal).transpose(1, 2)  # [n, L, heads, D]
            if len(groups) == 1 and consecutive:
                return out.reshape(T, *out.shape[2:])
            for i, d in enumerate(docs):
                pieces[d] = out[i]
        return torch.cat(pieces, dim=0)


class KVCacheError(ValueError):
    """A KV cache used out of order, over its capacity, or on a model it cannot serve."""


class KVCache:
    """Post-rotary keys and values of one batch of generated rows, per layer, on the model's device.

    Rows are **right-padded**: row ``b``'s first ``lengths[b]`` cached positions are real. Use:

    1. :meth:`prefill` with the prompts' real lengths, then one forward of the right-padded prompts
       ``[B, S]`` (positions from 0): every layer stores its keys/values at positions ``0..S-1``
       and attends causally inside the call as without a cache (a row's padding comes after its
       real tokens, so causality already hides it);
    2. per step, :meth:`decode`, then one forward of ``[B, 1]`` tokens at positions ``lengths``:
       each layer writes row ``b``'s new key/value at position ``lengths[b]`` (over the padding
       the prompt left there) and the query attends over positions ``0..lengths[b]`` only, through
       a ``[B, 1, 1, span]`` key mask — no S×S tensor exists after the prompt;
    3. :meth:`keep` drops finished rows (all layers and the lengths, in one place).

    Under tensor parallelism each rank's cache holds its own heads, as its attention does.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise KVCacheError(f"a KV cache needs a capacity of at least 1 position, got {capacity}")
        self.capacity = int(capacity)
        self.lengths: Optional[Tensor] = None
        """[B] int64: positions cached per row (real ones; padding beyond is never attended)."""
        self._kv: dict[int, tuple[Tensor, Tensor]] = {}
        self._phase: Optional[str] = None
        self._write: Optional[Tensor] = None  # [B] decode write positions
        self._mask: Optional[Tensor] = None  # [B, 1, 1, span] bool, True = attend
        self._span = 0
        self._seen: set[int] = set()  # layers that stored this forward's keys/values

    @property
    def batch(self) -> int:
        return 0 if self.lengths is None else int(self.lengths.shape[0])

    def prefill(self, lengths: Sequence[int], device: torch.device | str) -> None:
        """The next forward is the prompt, right-padded; ``lengths`` are its rows' real lengths."""
        if self._phase is not None or self._kv:
            raise KVCacheError("KVCache.prefill runs once, on an empty cache")
        if not lengths or min(lengths) < 1 or max(lengths) > self.capacity:
            raise KVCacheError(f"prompt lengths must be in [1, {self.capacity}], got {list(lengths)}")
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.int64, device=device)
        self._span = max(lengths)
        self._phase = "prefill"
        self._seen = set()

    def decode(self) -> Tensor:
        """The next forward is one token per row; returns its positions ``[B, 1]`` (the rotary
        positions and the cache slots it is written at)."""
        if self.lengths is None:
            raise KVCacheError("KVCache.decode before prefill")
        top = int(self.lengths.max())
        if top >= self.capacity:
            raise KVCacheError(f"KV cache full: a row has {top} cached positions, capacity {self.capacity}")
        self._write = self.lengths.clone()
        self._span = top + 1
        self._mask = (torch.arange(self._span, device=self.lengths.device)[None, :]
                      <= self._write[:, None])[:, None, None, :]
        self.lengths = self.lengths + 1
        self._phase = "decode"
        self._seen = set()
        return self._write[:, None]

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (indices into the current batch, in their new order)."""
        if self.lengths is None:
            raise KVCacheError("KVCache.keep before prefill")
        idx = torch.as_tensor(list(rows), dtype=torch.int64, device=self.lengths.device)
        self.lengths = self.lengths.index_select(0, idx)
        self._kv = {n: (k.index_select(0, idx), v.index_select(0, idx)) for n, (k, v) in self._kv.items()}
        self._phase = None  # the next forward needs decode() again

    def update(self, layer: int, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """Store this call's ``[S, B, heads, D]`` keys/values for ``layer``; return the keys and
        values to attend over and their key mask (None: the call's own, causally, i.e. the prompt;
        else ``[B, heads, span, D]`` cached ones and the ``[B, 1, 1, span]`` mask)."""
        S, B = key.shape[:2]
        if B != self.batch:
            raise KVCacheError(f"KV cache holds {self.batch} rows, the forward has {B}")
        if layer in self._seen:
            raise KVCacheError(f"layer {layer} already stored this forward's keys: call decode() "
                               f"before each forward after the prompt")
        if self._phase in ("prefill", "decode"):
            self._seen.add(layer)
        if self._phase == "prefill":
            if S != self._span:
                raise KVCacheError(f"the prompt forward has {S} positions, its longest row {self._span}")
            shape = (B, key.shape[2], self.capacity, key.shape[3])
            k_buf = key.new_zeros(shape)
            v_buf = value.new_zeros(shape)
            k_buf[:, :, :S] = key.permute(1, 2, 0, 3)
            v_buf[:, :, :S] = value.permute(1, 2, 0, 3)
            self._kv[layer] = (k_buf, v_buf)
            return key, value, None
        if self._phase != "decode":
            raise KVCacheError("KVCache: call prefill() or decode() before each forward")
        if S != 1:
            raise KVCacheError(f"a decode step runs one token per row, got {S} positions")
        if layer not in self._kv:
            raise KVCacheError(f"layer {layer} has no prompt in the KV cache")
        k_buf, v_buf = self._kv[layer]
        rows = torch.arange(B, device=key.device)
        k_buf[rows, :, self._write] = key[0]
        v_buf[rows, :, self._write] = value[0]
        return k_buf[:, :, :self._span], v_buf[:, :, :self._span], self._mask

    @contextlib.contextmanager
    def attached(self, seats: Sequence["SDPAttention"]) -> Iterator[None]:
        """Make ``seats`` read and write this cache for the duration of one forward."""
        for s in seats:
            s.kv_cache = self
        try:
            yield
        finally:
            for s in seats:
                s.kv_cache = None


def cache_seats(decoder) -> list["SDPAttention"]:
    """The core attentions of a TransformerBlock's layers, which must all be :class:`SDPAttention`
    for a :class:`KVCache` (raises :class:`KVCacheError` naming what sits there otherwise, e.g.
    Transformer Engine's attention)."""
    seats = []
    for layer in decoder.layers:
        core = getattr(getattr(layer, "self_attention", None), "core_attention", None)
        if not isinstance(core, SDPAttention):
            raise KVCacheError(f"the KV cache lives in megavlm's SDPAttention; layer "
                               f"{getattr(layer, 'layer_number', '?')} has {type(core).__name__}")
        seats.append(core)
    return seats
