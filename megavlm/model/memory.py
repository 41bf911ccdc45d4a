"""Per-rank GPU memory of a recipe at a layout, without a GPU: ``megavlm plan --memory``.

Why: a user should know before launching whether DCLM-1.4B at micro-batch 8 fits an 80 GB GPU at
TP1 / DP8, and which knob (recompute, TP, sequence parallel) buys how much. Four parts, per rank:

**Parameters, gradients, optimizer state** — counted exactly from an inventory of this rank's
parameter shapes (``inventory``: the local spec's modules in registration order: embedding V/t x d
and projector on the first pipeline stage, per layer the two gain-only norms (d), QKV 3d/t x d,
the full-width qk-norm gains (d/t each, split like the heads), the output projection d x d/t,
SwiGLU fc1 2f/t x d and fc2 d x f/t, the final norm and output layer V/t x d on the last stage).
megavlm's DDP config has ``grad_reduce_in_fp32`` and the distributed optimizer, so (megatron-core
0.19.2, distributed/param_and_grad_buffer.py and optimizer/param_layout.py):

* the trainable parameters live in one contiguous buffer laid out in reverse registration order,
  each parameter's start aligned to 64 elements, the end padded to lcm(DP, 128): parameters take
  (padded buffer) x 2 bytes in bf16 (4 in fp32), frozen ones their own size;
* gradients take (padded buffer) x 4 bytes (fp32 grads, whatever the parameter dtype);
* the optimizer (DistributedOptimizer, Adam) owns 1/DP of the buffer: per owned parameter element
  an fp32 main copy (bf16 training only; fp32 training updates the parameter in place) plus
  Adam's m and v in fp32: 12 bytes (bf16) or 8 bytes (fp32) per owned element.

**Activations** — what autograd saves in the forward of one microbatch, per layer, following the
accounting of Korthikanti et al., *Reducing Activation Recomputation in Large Transformer Models*
(2022): there a GPT layer with dropout stores s·b·h·(34 + 5·a·s/h) bytes in 16-bit, the 34 from the
linear/norm/dropout inputs and the 5·a·s/h from the attention scores, softmax and its dropout mask;
tensor parallelism divides the parts inside the TP region by t, sequence parallelism divides the
rest, selective recomputation drops the score terms, full recomputation keeps only each layer's
input. Our layer has no dropout, SwiGLU instead of GELU, gain-only LayerNorms, a full-width qk-norm
and RoPE; counted tensor by tensor for the local spec (e = activation bytes, U = s·b·h elements):

* 4 U replicated over TP (÷t with sequence parallelism): the inputs of both norms and of the two
  column-parallel linears (the norm outputs);
* 8 U / t inside the TP region: the qk-norm outputs (2; their inputs are views of the fused QKV
  output), the rotated q and kᵀ (2), the fused QKV output kept for v and the qk-norms (3) and the
  attention output projection's input (1). Every norm runs in the activations' dtype and saves
  only its input and per-row statistics (megavlm.model.norms): no fp32 copies;
* 5 s·b·f / t for SwiGLU: fc1's output (2f), gate activation, product and fc2's input (3f);
* attention scores, dense path only (megatron's unfused DotProductAttention): the softmax output
  b·(a/t)·s² in e bytes plus a boolean s x s causal mask; a flash/packed path (TE fused attention,
  megavlm's packed attention) never stores s x s, it keeps a log-sum-exp of b·(a/t)·s fp32
  instead; ``recompute=selective`` recomputes the core attention from its q, k, v inputs, so the
  score terms go and only a 4-byte scale is saved;
* small terms: four RoPE cos/sin tables of s·b·head_dim (megatron casts them to the activations'
  dtype, rope_utils._apply_rotary_pos_emb_bshd) and eight per-token norm statistics
  (mean and 1/std of the four norms; fp32 on CUDA, the input dtype on a CPU — counted as fp32);
* ``recompute=full`` (megatron uniform, one layer per checkpoint) saves only each layer's input
  (U·e) plus one shared RoPE table, and recomputes one layer at a time in the backward (that
  layer's full activations are added to the peak).

Outside the layers: the token ids (8 bytes each) on the first stage; the final norm's input and
statistics and the loss on the last stage. The loss saves, for n = the microbatch's loss rows:
the reference (megavlm.ops.masked_ce) the gathered rows n·d·e and fp32 log-softmax and logits
(n·V/t·8 bytes with z-loss); the fused kernel only the rows and two fp32 scalars per row, plus a
``chunk_bytes`` gradient-logits chunk and an fp32 n·d row gradient in the backward.

**Pipeline**: with 1F1B the first stage holds the activations of min(pp, microbatches)
microbatches (its warm-up plus one); the interleaved schedule holds, in model-chunk units,
2·(pp−1) + (vpp−1)·pp + 1 (megatron's warm-up count for rank 0), each chunk of L/(pp·vpp) layers.
The peak of a rank is the sum of the four parts plus the larger of the loss transient and (full
recompute) one recomputed layer. Not counted: the CUDA context and NCCL buffers (about 0.5-1 GiB),
allocator fragmentation, TE/FP8 workspaces and amax histories: ``fits`` keeps a stated margin.

The parameter, gradient and optimizer counts are exact (tests/model/test_memory.py builds the
model and optimizer and compares byte for byte); the activation count of the local spec matches
saved-tensor-hook measurements in fp32 and bf16 on CPU within 1 % (the test) and is an estimate
for the TE spec.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal, Optional

from megavlm.config import ModelConfig, RunConfig

Attention = Literal["flash", "dense"]
LossPath = Literal["fused", "reference"]
GiB = 2 ** 30


@dataclass(frozen=True)
class Layout:
    """Everything besides the model that decides a rank's memory."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    vpp: Optional[int] = None
    sequence_parallel: bool = False
    recompute: Literal["none", "selective", "full"] = "none"
    micro_batch: int = 1
    seq_length: int = 2048
    num_microbatches: int = 1
    """Per step and data-parallel rank (global batch / (micro batch x DP))."""
    precision: Literal["bf16", "fp32"] = "bf16"
    attention: Attention = "flash"
    loss: LossPath = "fused"
    trainable: str = "projector+lm"
    """What trains: lm (projector frozen), projector, projector+lm or all."""
    chunk_bytes: int = 64 << 20
    """Fused masked-CE backward chunk (megavlm.kernels.masked_ce.TileConfig.chunk_bytes)."""

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp", "micro_batch", "seq_length", "num_microbatches"):
            if getattr(self, name) < 1:
                raise ValueError(f"Layout.{name}={getattr(self, name)} must be >= 1")
        if self.sequence_parallel and self.tp < 2:
            raise ValueError("sequence parallelism needs tp >= 2")
        if self.attention not in ("flash", "dense"):
            raise ValueError(f"Layout.attention={self.attention!r}: flash or dense")
        if self.loss not in ("fused", "reference"):
            raise ValueError(f"Layout.loss={self.loss!r}: fused or reference")

    @property
    def element_bytes(self) -> int:
        return 2 if self.precision == "bf16" else 4


@dataclass(frozen=True)
class Param:
    name: str
    numel: int
    trainable: bool


@dataclass
class MemoryPlan:
    """Bytes of one rank (the first pipeline stage, which holds the most activations, unless a
    later stage's parameters and loss outweigh it: ``plan_memory`` reports the largest)."""

    stage: int
    parameters: int
    gradients: int
    optimizer: int
    activations: int
    transient: int
    """Largest short-lived extra: loss temporaries, or one recomputed layer under full recompute."""
    detail: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.transient

    def fits(self, capacity_gib: float, margin_gib: float = 2.0) -> bool:
        """Whether the peak plus ``margin_gib`` (CUDA context, NCCL, fragmentation) fits."""
        return self.total + margin_gib * GiB <= capacity_gib * GiB

    def as_dict(self) -> dict:
        out = asdict(self)
        out["total"] = self.total
        return out


# ------------------------------------------------------------------------------- parameters

def _is_trainable(name: str, trainable: str) -> bool:
    is_projector = name.startswith("projector.")
    return {"projector": is_projector, "lm": not is_projector}.get(trainable, True)


def inventory(model: ModelConfig, layout: Layout, stage: int) -> list[Param]:
    """This rank's parameters (TP rank any: shards are equal) in module registration order."""
    d, f, V, t = model.hidden_size, model.ffn_hidden_size, model.vocab_size, layout.tp
    chunks = layout.vpp or 1
    per_chunk = model.num_layers // (layout.pp * chunks)
    items: list[tuple[str, int]] = []
    for chunk in range(chunks):
        first = stage == 0 and chunk == 0
        last = stage == layout.pp - 1 and chunk == chunks - 1
        p = f"chunk{chunk}." if chunks > 1 else ""
        if first:
            items.append((p + "embedding.word_embeddings.weight", V // t * d))
            if model.vision is not None:
                dv, hidden = model.vision.embed_dim, model.vision.projector_mult * model.vision.embed_dim
                items += [(p + "projector.fc1.weight", hidden // t * dv),
                          (p + "projector.fc1.bias", hidden // t),
                          (p + "projector.fc2.weight", d * (hidden // t)),
                          (p + "projector.fc2.bias", d)]
        for layer in range(per_chunk):
            q = f"{p}decoder.layers.{layer}."
            items += [(q + "input_layernorm.weight", d),
                      (q + "self_attention.linear_proj.weight", d * (d // t)),
                      (q + "self_attention.linear_qkv.weight", 3 * d // t * d)]
            if model.qk_norm:
                items += [(q + "self_attention.q_layernorm.weight", d // t),
                          (q + "self_attention.k_layernorm.weight", d // t)]
            items += [(q + "pre_mlp_layernorm.weight", d),
                      (q + "mlp.linear_fc1.weight", 2 * f // t * d),
                      (q + "mlp.linear_fc2.weight", d * (f // t))]
        if last:
            items += [(p + "decoder.final_layernorm.weight", d),
                      (p + "output_layer.weight", V // t * d)]
    return [Param(n, k, _is_trainable(n.split(".", 1)[1] if n.startswith("chunk") else n,
                                      layout.trainable)) for n, k in items]


def buffer_layout(params: list[Param], dp: int) -> tuple[int, list[tuple[int, int]]]:
    """(padded numel, [start, end) of each trainable parameter) of one chunk's grad buffer, as
    megatron's DistributedOptimizer lays it out (reverse order, 64-element starts, end padded to
    lcm(dp, 128))."""
    ranges = []
    start = end = 0
    for p in reversed([p for p in params if p.trainable]):
        start = math.ceil(start / 64) * 64
        end = start + p.numel
        ranges.append((start, end))
        start = end
    if not ranges:
        return 0, []
    divisor = math.lcm(dp, 128)
    return math.ceil(end / divisor) * divisor, ranges


def owned_elements(padded: int, ranges: list[tuple[int, int]], dp: int, dp_rank: int = 0) -> int:
    """Parameter elements of one DP rank's optimizer shard (padding is owned by nobody)."""
    size = padded // dp
    lo, hi = dp_rank * size, (dp_rank + 1) * size
    return sum(max(0, min(e, hi) - max(s, lo)) for s, e in ranges)


def _chunks(model: ModelConfig, layout: Layout, stage: int) -> list[list[Param]]:
    """Per model chunk: each chunk is its own DDP module with its own buffer."""
    params = inventory(model, layout, stage)
    if not layout.vpp:
        return [params]
    return [[p for p in params if p.name.startswith(f"chunk{c}.")] for c in range(layout.vpp)]


def state_bytes(model: ModelConfig, layout: Layout, stage: int, dp_rank: int = 0) -> dict[str, int]:
    """Exact parameter, gradient and optimizer bytes of one rank, with the element counts."""
    e = layout.element_bytes
    params = grads = owned = numel = frozen = padded_total = 0
    for chunk in _chunks(model, layout, stage):
        padded, ranges = buffer_layout(chunk, layout.dp)
        frozen_here = sum(p.numel for p in chunk if not p.trainable)
        params += padded * e + frozen_here * e
        grads += padded * 4
        owned += owned_elements(padded, ranges, layout.dp, dp_rank)
        numel += sum(p.numel for p in chunk)
        frozen += frozen_here
        padded_total += padded
    per_owned = 12 if layout.precision == "bf16" else 8
    return dict(parameters=params, gradients=grads, optimizer=owned * per_owned,
                param_numel=numel, frozen_numel=frozen, buffer_numel=padded_total,
                optimizer_numel=owned)


# ------------------------------------------------------------------------------ activations

def layer_activation_bytes(model: ModelConfig, layout: Layout, recompute: Optional[str] = None) -> int:
    """Bytes one decoder layer saves for the backward of one microbatch (module docstring)."""
    s, b, h, f = layout.seq_length, layout.micro_batch, model.hidden_size, model.ffn_hidden_size
    a, t, e, hd = model.num_attention_heads, layout.tp, layout.element_bytes, model.head_dim
    recompute = recompute or layout.recompute
    sp = t if layout.sequence_parallel else 1
    if recompute == "full":
        return s * b * h * e // sp
    qk_terms = 2 if model.qk_norm else 0
    u_split = 6 + qk_terms  # qk-norm outputs (2), rotated q, k^T, QKV output (3), proj input
    total = e * (4 * s * b * h // sp + u_split * s * b * h // t + 5 * s * b * f // t)
    total += e * 4 * s * b * hd  # RoPE cos/sin tables, cast to the activations' dtype by megatron
    total += 4 * (4 * s * b // sp + (4 * s * b if model.qk_norm else 0))  # norm mean + 1/std
    if recompute == "selective":
        total += 4  # the softmax scale saved by the checkpointed core attention
    elif layout.attention == "dense":
        total += e * b * (a // t) * s * s + s * s  # softmax output + boolean causal mask
    else:
        total += 4 * b * (a // t) * s  # flash/packed attention: log-sum-exp per row
    return total


def loss_bytes(model: ModelConfig, layout: Layout, loss_rows: int) -> tuple[int, int]:
    """(saved, transient) bytes of the masked loss on ``loss_rows`` rows of one microbatch."""
    d, v, e = model.hidden_size, model.vocab_size // layout.tp, layout.element_bytes
    n = loss_rows
    if layout.loss == "reference":
        saved = n * d * e + n * v * (8 if model.z_loss else 4) + n * 8 * 3
        return saved, n * v * (e + 4)  # matmul output and its fp32 copy while log-softmax runs
    return n * d * e + n * 8 + n * 8, layout.chunk_bytes + n * d * 4


def inflight_microbatches(layout: Layout, stage: int) -> int:
    """Microbatches (model-chunk microbatches when interleaved) whose activations a pipeline
    rank holds at once under megatron's 1F1B schedules."""
    if layout.pp == 1:
        return 1
    if layout.vpp:
        total = layout.num_microbatches * layout.vpp
        warmup = (layout.pp - stage - 1) * 2 + (layout.vpp - 1) * layout.pp
        return min(warmup + 1, total)
    return min(layout.pp - stage, layout.num_microbatches)


def activation_bytes(model: ModelConfig, layout: Layout, stage: int,
                     loss_rows: Optional[int] = None) -> tuple[int, int, dict]:
    """(stored, transient, detail) activation bytes of one pipeline rank."""
    s, b, h, e = layout.seq_length, layout.micro_batch, model.hidden_size, layout.element_bytes
    sp = layout.tp if layout.sequence_parallel else 1
    chunks = layout.vpp or 1
    layers_per_chunk = model.num_layers // (layout.pp * chunks)
    per_layer = layer_activation_bytes(model, layout)
    inflight = inflight_microbatches(layout, stage)
    per_mb = layers_per_chunk * per_layer
    if layout.recompute == "full":
        per_mb += 4 * s * b * model.head_dim  # one RoPE table shared by the checkpoints
    stored = inflight * per_mb
    first, last = stage == 0, stage == layout.pp - 1
    if first:
        stored += inflight * s * b * 8  # token ids kept by the embedding lookup
    transient = 0
    loss_saved = 0
    if last:
        n = b * s if loss_rows is None else loss_rows
        final_norm = s * b * h * e // sp + 2 * 4 * s * b // sp
        loss_saved, loss_transient = loss_bytes(model, layout, n)
        stored += final_norm + loss_saved
        transient = loss_transient
    if layout.recompute == "full":
        transient = max(transient, layer_activation_bytes(model, layout, "none"))
    return stored, transient, dict(per_layer=per_layer, inflight_microbatches=inflight,
                                   layers_per_microbatch=layers_per_chunk, loss_saved=loss_saved)


# ------------------------------------------------------------------------------------ plans

def plan_stage(model: ModelConfig, layout: Layout, stage: int) -> MemoryPlan:
    state = state_bytes(model, layout, stage)
    stored, transient, detail = activation_bytes(model, layout, stage)
    return MemoryPlan(stage, state["parameters"], state["gradients"], state["optimizer"], stored,
                      transient, detail={**state, **detail})


def plan_memory(model: ModelConfig, layout: Layout) -> MemoryPlan:
    """The pipeline rank with the largest peak."""
    return max((plan_stage(model, layout, s) for s in range(layout.pp)), key=lambda p: p.total)


def layout_of(run: RunConfig, dp: int = 1, stage_index: int = 0, attention: Attention = "flash",
              loss: LossPath = "fused", precision: Optional[str] = None) -> Layout:
    """The Layout of a recipe's stage at data-parallel size ``dp`` (its own seq_length)."""
    from megavlm.config import num_microbatches

    par, t = run.parallel, run.train
    stage = run.stages[stage_index]
    prec = precision or ("fp32" if run.precision.dtype == "fp32" else "bf16")
    return Layout(tp=par.tp, pp=par.pp, dp=dp, vpp=par.vpp,
                  sequence_parallel=par.sequence_parallel, recompute=par.recompute,
                  micro_batch=t.micro_batch_size, seq_length=run.stage_seq_length(stage),
                  num_microbatches=num_microbatches(t, dp, stage.global_batch_size), precision=prec,
                  attention=attention, loss=loss, trainable=stage.trainable)


def describe(plan: MemoryPlan, layout: Layout, capacity_gib: float = 79.6) -> list[str]:
    """Human-readable lines of a plan."""
    g = lambda x: f"{x / GiB:7.2f} GiB"  # noqa: E731
    verdict = "fits" if plan.fits(capacity_gib) else "does NOT fit"
    return [f"memory per rank (pipeline stage {plan.stage}; tp {layout.tp}, pp {layout.pp}, "
            f"dp {layout.dp}, sp {layout.sequence_parallel}, recompute {layout.recompute}, "
            f"micro-batch {layout.micro_batch} x seq {layout.seq_length}, {layout.precision}, "
            f"attention {layout.attention}, loss {layout.loss}):",
            f"  parameters   {g(plan.parameters)}",
            f"  gradients    {g(plan.gradients)}  (fp32 grad buffer)",
            f"  optimizer    {g(plan.optimizer)}  (fp32 main params + Adam m, v over dp {layout.dp})",
            f"  activations  {g(plan.activations)}  ({plan.detail['inflight_microbatches']} "
            f"microbatch(es) in flight)",
            f"  transient    {g(plan.transient)}",
            f"  peak         {g(plan.total)}  -> {verdict} {capacity_gib:g} GiB (an '80 GB' H100/A100) with 2 GiB margin"]


def recipe_memory(run: RunConfig, dp: int = 1, attention: Attention = "flash",
                  loss: LossPath = "fused", capacity_gib: float = 79.6) -> list[dict]:
    """One entry per stage of the recipe (what trains differs): the worst rank's plan and
    whether it fits ``capacity_gib``; the ``memory`` field of ``megavlm plan --json --memory``."""
    out = []
    for i, stage in enumerate(run.stages):
        layout = layout_of(run, dp=dp, stage_index=i, attention=attention, loss=loss)
        plan = plan_memory(run.model, layout)
        entry = plan.as_dict()
        entry["pipeline_stage"] = entry.pop("stage")
        out.append(dict(stage=stage.name, layout=asdict(layout), capacity_gib=capacity_gib,
                        fits=plan.fits(capacity_gib), lines=describe(plan, layout, capacity_gib),
                        **entry))
    return out
