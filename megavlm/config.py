"""The typed configuration tree of a megavlm run.

One YAML recipe (launch/configs/*.yaml) becomes one :class:`RunConfig`. Every concern owns a
dataclass, every field carries a docstring, and validation happens in ``__post_init__`` so a
bad recipe fails before anything is built. Components receive only their own sub-config.

Loading is strict: an unknown key is an error naming the key and the closest valid one, a value
of the wrong type is an error naming the dotted path. Dotted overrides (``stages.1.tokens=1e6``)
are applied to the raw tree before conversion, so they go through the same checks.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A recipe or override that cannot become a valid RunConfig."""


# --------------------------------------------------------------------------------------------
# model


@dataclass
class VisionConfig:
    """The frozen image encoder's output as the trainer sees it, and the projector on top."""

    embed_dim: int = 1152
    """Width d_v of one stored patch embedding (SigLIP so400m: 1152, EfficientNet-Lite0: 1280)."""
    num_patches: int = 729
    """Patch embeddings per image (SigLIP @384: 27x27 = 729)."""
    projector_mult: int = 4
    """Projector hidden width as a multiple of embed_dim: Linear(d_v, m*d_v), GELU, Linear(m*d_v, d_model)."""
    encoder: Optional[str] = None
    """Name of the frozen encoder whose stored embeddings the projector reads (e.g.
    efficientnet-lite0, siglip-so400m-patch14-384); when set, a store from another encoder is refused."""
    resize: Optional[Literal["letterbox", "square"]] = None
    """How the stores' images were made square (tools/encode_images.py --resize); when set, a store
    resized otherwise is refused. Evaluation encodes benchmark images the same way (megavlm.eval.images:
    the training store's record first, else this)."""

    def __post_init__(self):
        _positive(self, "embed_dim", "num_patches", "projector_mult")


@dataclass
class ModelConfig:
    """A DCLM / OpenLM decoder (gain-only LayerNorm, full-width qk-norm, SwiGLU, RoPE, no biases)."""

    num_layers: int = 2
    """Transformer blocks."""
    hidden_size: int = 128
    """Model width d_model."""
    num_attention_heads: int = 4
    """Attention heads; head_dim = hidden_size / num_attention_heads."""
    ffn_hidden_size: int = 384
    """SwiGLU hidden width (gate and up projections are fused into one matrix of 2x this)."""
    vocab_size: int = 8192
    """Embedding / output rows; must be >= the tokenizer's vocabulary and divisible by tp."""
    seq_length: int = 256
    """Training sequence length in positions (image patches count as positions)."""
    norm_eps: float = 1e-5
    """LayerNorm epsilon (all norms are gain-only)."""
    qk_norm: bool = True
    """One LayerNorm over the whole heads*head_dim q (and k) vector, before the per-head reshape."""
    rope_base: float = 10000.0
    """Rotary embedding base."""
    init_std: Optional[float] = None
    """Std of the truncated-normal init; None = OpenLM's 1/sqrt(hidden_size)."""
    z_loss: float = 1e-4
    """Coefficient of the z-loss (log Z)^2 added per loss token (DCLM: 1e-4); 0 turns it off."""
    backend: Literal["auto", "local", "te"] = "auto"
    """Layer implementation: te = Transformer Engine linears and attention (needs TE and a CUDA
    GPU), local = megatron-core's own modules (runs anywhere), auto = te when usable, else local.
    Both fill the same seats with the same parameter names, so checkpoints move between them."""
    vision: VisionConfig = field(default_factory=VisionConfig)
    """Image embeddings and projector."""

    def __post_init__(self):
        _positive(self, "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                  "vocab_size", "seq_length")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"model.hidden_size={self.hidden_size} is not divisible by "
                              f"model.num_attention_heads={self.num_attention_heads}")
        if self.z_loss < 0:
            raise ConfigError("model.z_loss must be >= 0")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


# --------------------------------------------------------------------------------------------
# parallelism and training


@dataclass
class ParallelConfig:
    """How the world is split; data parallel size is whatever is left of the world."""

    IDENTITY: ClassVar[bool] = False
    """Not identity: checkpoints reshard across layouts (the global batch stays the same)."""

    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    vpp: Optional[int] = None
    """Virtual pipeline stages per pipeline rank (interleaved schedule); None = not interleaved."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs tp > 1)."""
    recompute: Literal["none", "full", "selective"] = "none"
    """Activation recomputation granularity."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend; auto = nccl with CUDA, gloo without."""

    def __post_init__(self):
        _positive(self, "tp", "pp")
        if self.vpp is not None and (self.vpp < 2 or self.pp < 2):
            raise ConfigError("parallel.vpp needs pp >= 2 and vpp >= 2 (or leave it null)")
        if self.sequence_parallel and self.tp < 2:
            raise ConfigError("parallel.sequence_parallel needs parallel.tp >= 2")


@dataclass
class WandbConfig:
    """A Weights & Biases run of the logging rank."""

    project: str = "megavlm"
    """W&B project."""
    name: Optional[str] = None
    """Run name (default: the run folder's name)."""
    mode: Literal["offline", "online", "disabled"] = "offline"
    """offline writes files under dir for `wandb sync`; online needs a login; disabled logs nothing."""
    dir: Optional[str] = None
    """Where W&B writes its files (default: run_dir)."""


NOT_IDENTITY = {"identity": False}
"""Field metadata: a re-run may change this field and still skip or resume the run's stages
(megavlm.preflight.non_identity_keys reads it)."""


@dataclass
class TrainConfig:
    """Batching shared by all stages."""

    IDENTITY: ClassVar[bool] = True
    """Part of run identity: a run folder's checkpoints belong to these values."""

    micro_batch_size: int = field(default=4, metadata=NOT_IDENTITY)
    """Sequences per microbatch per data-parallel rank (not identity: the global batch stays)."""
    global_batch_size: int = 8
    """Sequences per optimizer step over all microbatches and data-parallel ranks."""
    deterministic: bool = True
    """Use deterministic kernels so a resumed run reproduces the uninterrupted one."""

    def __post_init__(self):
        _positive(self, "micro_batch_size", "global_batch_size")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError("train.global_batch_size must be a multiple of train.micro_batch_size")


@dataclass
class OptimizerConfig:
    """AdamW settings shared by all stages (a stage may override weight_decay and adam_beta2)."""

    IDENTITY: ClassVar[bool] = True

    weight_decay: float = 0.1
    """AdamW decoupled weight decay (not applied to norms)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables clipping."""


@dataclass
class PrecisionConfig:
    """Training precision and FP8."""

    IDENTITY: ClassVar[bool] = True

    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """auto = bf16 on GPUs that support it, fp32 on CPU."""
    fp8: Literal["none", "delayed", "current"] = "none"
    """FP8 matmuls in the transformer layers through Transformer Engine recipes: delayed = scales
    from an amax history (TE DelayedScaling), current = per-tensor scales of the tensor at hand
    (TE Float8CurrentScaling); none = bf16/fp32 only. Needs the te backend; the embedding,
    projector and output layer stay in the training precision."""
    fp8_format: Literal["hybrid", "e4m3"] = "hybrid"
    """FP8 formats: hybrid = e4m3 forward, e5m2 gradients; e4m3 = e4m3 everywhere."""
    fp8_amax_history_len: int = 1024
    """Delayed scaling: amax history length (the scale uses the max over it)."""

    def __post_init__(self):
        _positive(self, "fp8_amax_history_len")
        if self.fp8 != "none" and self.dtype == "fp32":
            raise ConfigError("precision.fp8 needs precision.dtype bf16 or auto (fp8 recipes train "
                              "bf16 master-precision layers), not fp32")


@dataclass
class GuardConfig:
    """What a non-finite or spiking loss does to the run (megavlm.train.guard)."""

    IDENTITY: ClassVar[bool] = False
    """Not identity: the guards of a running job may change between restarts."""

    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A NaN/Inf loss or gradient norm: stop (exit non-zero, nothing saved, the last good checkpoint
    stays the newest) or skip (drop the step's update on every rank; the step still counts)."""
    spike_factor: Optional[float] = None
    """A loss above spike_factor x the running median of the last spike_window steps is a spike
    (None = no spike rule)."""
    spike_window: int = 50
    """Steps in the running median of the spike rule (it starts judging once the window is full)."""
    on_spike: Literal["skip", "stop", "warn"] = "skip"
    """What a spike does: skip its update, stop as for a non-finite loss, or only warn and log it."""

    def __post_init__(self):
        _positive(self, "spike_window")
        if self.spike_factor is not None and self.spike_factor <= 1:
            raise ConfigError(f"guard.spike_factor={self.spike_factor} must be > 1 (or null)")


@dataclass
class PreemptionConfig:
    """Stopping cleanly on request (megavlm.train.preemption)."""

    IDENTITY: ClassVar[bool] = False

    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    """Signals that ask the run to stop cleanly: every rank finishes the current step, the run saves
    a complete checkpoint at it and exits with megavlm.train.preemption.EXIT_PREEMPTED (75).
    SLURM sends them ahead of a time limit or preemption (launch/slurm.sbatch). [] = none."""
    max_wall_minutes: Optional[float] = None
    """Stop the same way once this process has trained for this many minutes (None = no budget)."""

    def __post_init__(self):
        import signal as _signal

        for s in self.stop_signals:
            if not s.startswith("SIG") or not isinstance(getattr(_signal, s, None), _signal.Signals):
                raise ConfigError(f"preemption.stop_signals: {s!r} is not a signal name (e.g. SIGTERM, SIGUSR1)")
            if s in ("SIGKILL", "SIGSTOP"):
                raise ConfigError(f"preemption.stop_signals: {s} cannot be caught")
        if self.max_wall_minutes is not None and self.max_wall_minutes <= 0:
            raise ConfigError(f"preemption.max_wall_minutes={self.max_wall_minutes} must be > 0 (or null)")


@dataclass
class LoggingConfig:
    """Where and how often a run reports (metrics.jsonl always gets every step; megavlm.sinks)."""

    IDENTITY: ClassVar[bool] = False

    log_every: int = 1
    """Print a progress line every this many steps (metrics.jsonl always gets every step)."""
    tensorboard_dir: Optional[str] = None
    """Also log every step (and evaluation scores) as TensorBoard events here; relative to run_dir.
    Needs the tensorboard package (pip install 'megavlm[logging]')."""
    wandb: Optional[WandbConfig] = None
    """Also log to Weights & Biases (needs the wandb package)."""

    def __post_init__(self):
        _positive(self, "log_every")


LEGACY_KEYS = {
    **{f"train.{k}": f"optimizer.{k}" for k in ("weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "grad_clip")},
    "train.precision": "precision.dtype",
    **{f"train.{k}": f"precision.{k}" for k in ("fp8", "fp8_format", "fp8_amax_history_len")},
    **{f"train.{k}": f"guard.{k}" for k in ("on_nonfinite", "spike_factor", "spike_window", "on_spike")},
    **{f"train.{k}": f"preemption.{k}" for k in ("stop_signals", "max_wall_minutes")},
    **{f"train.{k}": f"logging.{k}" for k in ("log_every", "tensorboard_dir", "wandb")},
}
"""Keys of the single train section before it was split by concern (old recipes, saved config.yaml
files): still read for one release, with a DeprecationWarning naming the new key."""


def legacy_key(dotted: str) -> Optional[str]:
    """The new spelling of an old dotted key (or of a key below one, e.g. train.wandb.project), else None."""
    for old, new in LEGACY_KEYS.items():
        if dotted == old or dotted.startswith(old + "."):
            return new + dotted[len(old):]
    return None


def migrate_legacy(tree: dict, *, warn: bool = True, where: str = "config") -> dict:
    """Move the old train.* keys of a raw tree to their sections (in place; returns the tree).
    A key given both ways is an error naming both."""
    train = tree.get("train") if isinstance(tree, dict) else None
    if not isinstance(train, dict):
        return tree
    moved = []
    for old, new in LEGACY_KEYS.items():
        key = old.split(".", 1)[1]
        if key not in train:
            continue
        section, field_name = new.split(".", 1)
        dest = tree.get(section)
        if dest is None:
            dest = tree[section] = {}
        if not isinstance(dest, dict):
            raise ConfigError(f"{where}: {section} is {dest!r}, not a mapping")
        if field_name in dest:
            raise ConfigError(f"{where}: both {old} (old spelling) and {new} are set; keep {new}")
        dest[field_name] = train.pop(key)
        moved.append(f"{old} -> {new}")
    if moved and warn:
        warnings.warn(f"{where}: deprecated keys, read for one more release: " + ", ".join(moved),
                      DeprecationWarning, stacklevel=3)
    return tree


def num_microbatches(train: TrainConfig, dp: int = 1, global_batch: Optional[int] = None,
                     where: str = "train.global_batch_size") -> int:
    """Microbatches per optimizer step on each data-parallel rank:
    global batch / (micro_batch_size · dp), which must divide exactly. ``global_batch`` is a
    stage's own batch (StagePlan.global_batch_size; default train.global_batch_size), ``where``
    the key that set it, named in the error."""
    B = train.global_batch_size if global_batch is None else global_batch
    per = train.micro_batch_size * dp
    if dp < 1 or B % per:
        raise ConfigError(f"{where}={B} is not divisible by micro_batch_size*dp = {train.micro_batch_size}*{dp}")
    return B // per



# --------------------------------------------------------------------------------------------
# data


DEFAULT_PROMPT_TEMPLATE = "\n{question}\nAnswer the question using a single word or phrase."
"""LLaVA-1.5's short-answer prompt: the default data.prompt_template."""


@dataclass
class DataConfig:
    """Where the preprocessed data of a run lives (produced by tools/, never by the trainer)."""

    root: str = field(default="~/.cache/megavlm/demo", metadata=NOT_IDENTITY)
    """Folder holding the prepared corpora; relative paths below are resolved against it."""
    build: Literal["none", "demo"] = "none"
    """'demo': `megavlm prepare` (also run first by `megavlm train`, the demo and the sweep) builds the
    small offline corpus into root, cached; 'none' expects prepared files there. The trainer only reads."""
    tokenizer: str = "tokenizer.model"
    """sentencepiece model (or tokenizer.json) path."""
    text: list[str] = field(default_factory=lambda: ["text"])
    """Indexed token datasets (path prefixes of .bin/.idx) of plain text."""
    captions: list[str] = field(default_factory=lambda: ["captions"])
    """Image-caption datasets: prefix of caption tokens; '<prefix>.embeds' is its embedding store."""
    instructions: list[str] = field(default_factory=list)
    """Conversation datasets (tokens + loss masks + image references), for fine-tuning."""
    too_long: Literal["truncate", "reject"] = "truncate"
    """What to do with a sample longer than the sequence: truncate (and count) or raise."""
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    """How a question follows the image at evaluation (``{question}`` is replaced); it must phrase
    questions as the instruction data does (the demo's short-answer set uses the default). Recorded
    in every checkpoint's config.yaml; `megavlm eval` uses it unless --prompt (docs/own-data.md)."""

    def __post_init__(self):
        if "{question}" not in self.prompt_template:
            raise ConfigError(f"data.prompt_template={self.prompt_template!r} must contain {{question}}")

    def resolve(self, path: str) -> Path:
        root = Path(self.root).expanduser()
        p = Path(path).expanduser()
        return p if p.is_absolute() else root / p


@dataclass
class MixtureConfig:
    """Fractions of a stage's token positions drawn from each kind of source (must sum to 1)."""

    text: float = 1.0
    """Fraction of token positions from plain text."""
    captions: float = 0.0
    """Fraction of token positions from image-caption samples (image patches count)."""
    instructions: float = 0.0
    """Fraction of token positions from conversations."""

    def __post_init__(self):
        for k in ("text", "captions", "instructions"):
            v = getattr(self, k)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"mixture.{k}={v} must be in [0, 1]")
        s = self.text + self.captions + self.instructions
        if abs(s - 1.0) > 1e-6:
            raise ConfigError(f"mixture fractions sum to {s}, not 1 (text={self.text}, "
                              f"captions={self.captions}, instructions={self.instructions})")


# --------------------------------------------------------------------------------------------
# stages


@dataclass
class InitConfig:
    """Where a stage starts: fresh weights, or a checkpoint saved at a fraction of an earlier stage."""

    stage: Optional[str] = None
    """Name of the earlier stage to start from; None = fresh initialisation."""
    fraction: Optional[float] = None
    """Schedule fraction of that stage's checkpoint (it must be in that stage's checkpoint list)."""
    path: Optional[str] = None
    """Explicit checkpoint directory instead of (stage, fraction), e.g. an imported model."""

    def __post_init__(self):
        if (self.stage is None) != (self.fraction is None):
            raise ConfigError("init needs both stage and fraction (or neither)")
        if self.stage is not None and self.path is not None:
            raise ConfigError("init takes either stage+fraction or path, not both")
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"init.fraction={self.fraction} must be in (0, 1]")


@dataclass
class ScheduleSource:
    """The schedule an imported checkpoint was trained on and the fraction of it that it stands
    at, so ``continue`` can finish that schedule (the paper resumes DCLM-1B's released 80 %
    checkpoint and continues its LR; paper Sec. 3.1, Figure 3)."""

    kind: Literal["cosine"] = "cosine"
    """Shape of the source schedule (OpenLM / DCLM train with linear warmup then cosine)."""
    peak: Optional[float] = None
    """Peak LR of the source (DCLM-1B: 1e-2, paper Table 2)."""
    final: Optional[float] = None
    """Final LR of the source's cosine (DCLM: 1e-5)."""
    warmup_steps: Optional[int] = None
    """Warmup steps of the source (DCLM-1B: 5000, paper Table 2)."""
    steps: Optional[int] = None
    """Total optimizer steps of the source schedule (DCLM-1B: 4.3T / (256 x 2048))."""
    fraction: Optional[float] = None
    """Fraction of the source schedule the checkpoint stands at, in (0, 1) (the paper: 0.8)."""

    def __post_init__(self):
        missing = [k for k in ("peak", "final", "warmup_steps", "steps", "fraction") if getattr(self, k) is None]
        if missing:
            raise ConfigError(f"schedule.source needs {', '.join(missing)} (the schedule the checkpoint "
                              "was trained on and the fraction it stands at)")
        if self.fraction >= 1.0 and self.fraction <= 1.0 + 1e-12:
            raise ConfigError("schedule.source.fraction=1.0: continuing a finished schedule stays at its "
                              "final LR (the paper calls that too low); use schedule.kind=rewarm instead")
        if not 0.0 < self.fraction < 1.0:
            raise ConfigError(f"schedule.source.fraction={self.fraction} must be in (0, 1)")
        if self.steps <= 0 or self.warmup_steps < 0 or self.peak < 0 or self.final < 0:
            raise ConfigError("schedule.source: steps must be > 0, warmup_steps, peak and final >= 0")

    def describe(self) -> dict:
        return {"kind": self.kind, "peak": self.peak, "final": self.final,
                "warmup_steps": self.warmup_steps, "steps": self.steps, "fraction": self.fraction}


@dataclass
class ScheduleConfig:
    """The learning-rate schedule of a stage (see megavlm.train.schedule)."""

    kind: Literal["cosine", "continue", "rewarm"] = "cosine"
    """cosine: warmup then cosine; continue: the source stage's cosine from the init fraction;
    rewarm: warmup fraction then cosine (fine-tuning, 0 %/100 % starts)."""
    peak: Optional[float] = 3e-3
    """Peak LR (cosine, rewarm); ignored by continue, which inherits the source's."""
    final: Optional[float] = 1e-5
    """Final LR (cosine, rewarm); continue ends at the source's final LR."""
    warmup_steps: Optional[int] = None
    """Warmup steps (cosine); None derives it from warmup_fraction."""
    warmup_fraction: float = 0.01
    """Warmup as a fraction of the stage's steps (rewarm: the paper's w; cosine if warmup_steps is None)."""
    source: Optional[ScheduleSource] = None
    """continue from ``init.path``: the schedule that checkpoint was trained on; None = read it
    from the checkpoint's meta.json (checkpoints this trainer wrote record their schedule)."""

    def __post_init__(self):
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ConfigError(f"schedule.warmup_fraction={self.warmup_fraction} must be in [0, 1)")
        if self.kind != "continue":
            if self.peak is None or self.final is None:
                raise ConfigError(f"schedule kind {self.kind} needs peak and final")
            if self.peak < 0 or self.final < 0:
                raise ConfigError("schedule peak and final must be >= 0")


TRAINABLE = ("lm", "projector", "all")
"""What a stage can train (StageConfig.trainable)."""
TEXT_ATTENTION = ("document", "window")
"""How a stage's plain-text rows attend (StageConfig.text_attention)."""
TRAINABLE_ALIASES = {"projector+lm": "all"}
"""Deprecated spellings of a TRAINABLE value, still read (old recipes, saved config.yaml)."""


@dataclass(frozen=True)
class StageOptimizer:
    """A stage's resolved AdamW settings (see :meth:`StageConfig.optimizer`)."""

    weight_decay: float
    adam_beta1: float
    adam_beta2: float
    adam_eps: float
    grad_clip: float


@dataclass
class StageConfig:
    """One training stage: its data, what trains, where it starts, its budget and LR schedule."""

    name: str = "text"
    """Unique stage name; checkpoints live under <run_dir>/<name>/."""
    tokens: int = 0
    """Token budget (sequence positions, images included); steps = ceil(tokens / (global_batch * seq))."""
    trainable: Literal["lm", "projector", "all", "projector+lm"] = "all"
    """What trains: ``lm`` = the language model only (text pre-training: the projector sees no
    data, so it is frozen rather than decayed), ``projector`` = the projector only, ``all`` =
    everything that has weights (projector + language model; the image encoder is precomputed,
    so it never trains). ``projector+lm`` is a deprecated alias of ``all``, accepted with a
    DeprecationWarning and stored as ``all``."""
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    """Data mixture of the stage."""
    init: InitConfig = field(default_factory=InitConfig)
    """Where the stage's weights come from."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule."""
    checkpoint_fractions: list[float] = field(default_factory=lambda: [0.2, 0.4, 0.6, 0.8, 1.0])
    """Schedule fractions at which a checkpoint is kept (a later stage may start from one)."""
    save_every: int = field(default=0, metadata=NOT_IDENTITY)
    """Also save a resumable checkpoint every this many steps (0 = only at the fractions)."""
    epochs: Optional[int] = None
    """For fine-tuning: passes over the data; when set, the budget is epochs x the data's tokens."""
    weight_decay: Optional[float] = None
    """Override of optimizer.weight_decay for this stage."""
    adam_beta2: Optional[float] = None
    """Override of optimizer.adam_beta2 for this stage."""
    seq_length: Optional[int] = None
    """Positions per row in this stage (e.g. text at 2048, image-text at 1024, as the paper);
    None = model.seq_length. Steps follow from it (tokens / (global_batch * seq_length))."""
    budget: Literal["positions", "real"] = "positions"
    """What ``tokens`` counts: positions = every sequence position, padding included (steps =
    ceil(tokens / (global_batch x seq))); real = non-padding positions (image patches count), as
    the paper holds 28B real tokens across caption ratios; the planner walks the data plan from
    the known sample lengths to find the step count (megavlm.train.budget)."""
    batch_unit: Literal["rows", "examples"] = "rows"
    """What train.global_batch_size counts in this stage: rows (packed sequences) or examples —
    one conversation per row, Prismatic/LLaVA semantics, so with ``epochs`` the stage takes
    ceil(epochs x examples / global_batch) steps (the paper: 4 epochs of 665k at 256)."""
    pack_window: int = 1
    """Packing of captions / conversations: 1 = strictly in order (a row ends when the next
    sample does not fit); N > 1 = best fit among the next N samples of that source, which cuts
    padding while keeping the exact ratios, every sample once per epoch, and resume."""
    epoch_examples: Optional[int] = None
    """Examples in one pass when the data is not at hand (plan estimates with it, e.g. 665000 for
    the LLaVA mix, paper Appendix D); training always counts the real data."""
    global_batch_size: Optional[int] = None
    """This stage's global batch per optimizer step, in the stage's ``batch_unit`` (rows, or
    examples = one conversation per row); None = train.global_batch_size. E.g. the paper fine-tunes
    at 256 examples (App. D) whatever its text batch. A multiple of train.micro_batch_size (and, at
    launch, of micro_batch_size x data-parallel size). Part of run identity: a run folder refuses
    to resume a stage under another batch."""
    text_attention: Literal["document", "window"] = "document"
    """How plain-text rows attend (issue 25). ``document``: every document piece in a row is its
    own sequence — attention and RoPE positions restart at each document (our own text
    pre-training). ``window``: the text of a row is ONE causal window over the concatenated
    documents, positions running 0..n-1 through it and the last token of a document predicting
    the first of the next — how open_lm trained DCLM, so a stage continuing a DCLM checkpoint
    keeps the attention pattern it was trained with. Image-caption and instruction samples stay
    per document in both modes; the data order and the mixture's counts are the same."""

    def optimizer(self, opt: OptimizerConfig) -> "StageOptimizer":
        """The AdamW settings this stage trains with: its overrides over the run's ``optimizer``
        values (the one place the overrides are resolved)."""
        return StageOptimizer(
            weight_decay=opt.weight_decay if self.weight_decay is None else self.weight_decay,
            adam_beta1=opt.adam_beta1,
            adam_beta2=opt.adam_beta2 if self.adam_beta2 is None else self.adam_beta2,
            adam_eps=opt.adam_eps, grad_clip=opt.grad_clip)

    def __post_init__(self):
        if self.trainable in TRAINABLE_ALIASES:
            new = TRAINABLE_ALIASES[self.trainable]
            warnings.warn(f"stage {self.name}: trainable {self.trainable!r} is deprecated, write "
                          f"{new!r} (the same parameters train)", DeprecationWarning, stacklevel=2)
            self.trainable = new
        if self.trainable not in TRAINABLE:
            raise ConfigError(f"stage {self.name}: trainable {self.trainable!r} is not one of {list(TRAINABLE)}")
        if not self.name or "/" in self.name:
            raise ConfigError(f"stage name {self.name!r} must be non-empty and contain no '/'")
        if self.tokens <= 0 and self.epochs is None:
            raise ConfigError(f"stage {self.name}: tokens must be > 0")
        for f in self.checkpoint_fractions:
            if not 0.0 < f <= 1.0:
                raise ConfigError(f"stage {self.name}: checkpoint fraction {f} not in (0, 1]")
        if self.save_every < 0:
            raise ConfigError(f"stage {self.name}: save_every must be >= 0")
        if self.schedule.kind == "continue" and self.init.stage is None and self.init.path is None:
            raise ConfigError(f"stage {self.name}: schedule 'continue' needs init.stage and init.fraction "
                              "(a source stage), or init.path with schedule.source stating the schedule the "
                              "checkpoint was trained on (or a checkpoint of ours whose meta.json records it)")
        if self.schedule.kind == "continue" and self.init.stage is not None and self.schedule.source:
            raise ConfigError(f"stage {self.name}: schedule.source is for init.path; a stage source "
                              "(init.stage) brings its own schedule")
        if (self.schedule.kind == "continue" and self.init.fraction is not None
                and self.init.fraction >= 1.0 - 1e-9):
            raise ConfigError(f"stage {self.name}: 'continue' from fraction 1.0 stays at the source's "
                              "final LR (the paper calls that too low); use schedule.kind=rewarm")
        if self.seq_length is not None and self.seq_length <= 0:
            raise ConfigError(f"stage {self.name}: seq_length={self.seq_length} must be > 0")
        if self.batch_unit == "examples" and self.epochs is None:
            raise ConfigError(f"stage {self.name}: batch_unit=examples sizes the stage in epochs; set epochs")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"stage {self.name}: epochs must be >= 1")
        if self.pack_window < 1:
            raise ConfigError(f"stage {self.name}: pack_window must be >= 1")
        if self.epoch_examples is not None and self.epoch_examples <= 0:
            raise ConfigError(f"stage {self.name}: epoch_examples must be > 0")
        if self.global_batch_size is not None and (isinstance(self.global_batch_size, bool)
                                                   or self.global_batch_size <= 0):
            raise ConfigError(f"stages.{self.name}.global_batch_size={self.global_batch_size} must be a "
                              "positive integer (or null for train.global_batch_size)")
        if self.text_attention not in TEXT_ATTENTION:
            raise ConfigError(f"stage {self.name}: text_attention {self.text_attention!r} is not one "
                              f"of {list(TEXT_ATTENTION)}")


@dataclass
class EvalVisionConfig:
    """The vision half of an evaluation spec (megavlm.eval.tasks)."""

    suite: Optional[Literal["paper", "offline"]] = None
    """paper: the paper's benchmarks under data_root; offline: the demo-asset suite."""
    data_root: Optional[str] = None
    tasks: Optional[list[str]] = None
    """Paper-suite tasks (default: the preset's, else all)."""
    strict: bool = False


@dataclass
class EvalConfig:
    """How this run's checkpoints are scored by a sweep (megavlm.experiment.scoring) and by
    ``megavlm eval all --spec RECIPE``: the spec-file format of megavlm.eval.tasks. Empty (the
    default): the offline suites. Not identity: scoring does not change what was trained."""

    preset: Optional[str] = None
    """paper-table7 | paper-table8 | appendix-e: tasks, metrics and chance of that preset."""
    text_tasks: Optional[list[str]] = None
    """lm-eval tasks, TASK or TASK:METRIC (checked against the installed lm-eval before loading)."""
    chance: Optional[str] = None
    include_path: Optional[str] = None
    vision: EvalVisionConfig = field(default_factory=EvalVisionConfig)
    limit: Optional[int] = None

    def is_set(self) -> bool:
        v = self.vision
        return any(x is not None for x in (self.preset, self.text_tasks, self.chance, v.suite, v.data_root, v.tasks))


@dataclass
class RunConfig:
    """A whole run: the model, how it is parallelised and trained, its data and its stages."""

    run_dir: str = field(default="runs/tiny", metadata=NOT_IDENTITY)
    """Output folder: resolved config, metrics.jsonl, checkpoints per stage."""
    seed: int = 1234
    """Seed for weights (layout-independent) and data order."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor / pipeline / data parallel layout."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Batching."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """AdamW settings (a stage may override some)."""
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    """Training precision and FP8."""
    guard: GuardConfig = field(default_factory=GuardConfig)
    """Non-finite loss and spike rules."""
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)
    """Stop signals and time budget."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Progress lines, TensorBoard, W&B."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prepared data locations."""
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig(tokens=1_000_000)])
    """Stages, run in order."""
    eval: EvalConfig = field(default_factory=EvalConfig, metadata=NOT_IDENTITY)
    """How the run's checkpoints are scored (megavlm.eval.tasks); empty: the offline suites."""

    def __post_init__(self):
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"stage names must be unique, got {names}")
        if not self.stages:
            raise ConfigError("a run needs at least one stage")
        seen: dict[str, StageConfig] = {}
        for s in self.stages:
            if s.init.stage is not None:
                if s.init.stage not in seen:
                    raise ConfigError(f"stage {s.name} starts from stage {s.init.stage!r}, which is not "
                                      f"an earlier stage (earlier: {sorted(seen) or 'none'})")
                src = seen[s.init.stage]
                if not any(abs(s.init.fraction - f) < 1e-9 for f in src.checkpoint_fractions):
                    raise ConfigError(
                        f"stage {s.name} starts from {s.init.stage} at fraction {s.init.fraction}, "
                        f"which that stage never saves (its checkpoint_fractions: {src.checkpoint_fractions})")
            seen[s.name] = s
        if self.model.vocab_size % self.parallel.tp:
            raise ConfigError(f"model.vocab_size={self.model.vocab_size} must be divisible by "
                              f"parallel.tp={self.parallel.tp}")
        if self.model.num_attention_heads % self.parallel.tp:
            raise ConfigError("model.num_attention_heads must be divisible by parallel.tp")
        if self.precision.fp8 != "none" and self.model.backend == "local":
            raise ConfigError(f"precision.fp8={self.precision.fp8} needs model.backend te or auto "
                              "(FP8 runs through Transformer Engine layers)")
        if self.parallel.sequence_parallel:
            for s in self.stages:
                if self.stage_seq_length(s) % self.parallel.tp:
                    where = (f"stages.{s.name}.seq_length" if s.seq_length is not None
                             else "model.seq_length")
                    raise ConfigError(f"{where}={self.stage_seq_length(s)} must be a multiple of "
                                      f"parallel.tp={self.parallel.tp} under sequence parallel")
        for s in self.stages:
            if s.global_batch_size is not None and s.global_batch_size % self.train.micro_batch_size:
                raise ConfigError(f"stages.{s.name}.global_batch_size={s.global_batch_size} must be a multiple "
                                  f"of train.micro_batch_size={self.train.micro_batch_size}")
        stages_per_rank = self.parallel.pp * (self.parallel.vpp or 1)
        if self.model.num_layers % stages_per_rank:
            raise ConfigError(f"model.num_layers={self.model.num_layers} must be divisible by "
                              f"pp*vpp={stages_per_rank}")

    def stage_global_batch(self, stage: StageConfig) -> int:
        """Global batch of ``stage`` (its batch_unit per optimizer step): its own
        global_batch_size, else train.global_batch_size."""
        return self.train.global_batch_size if stage.global_batch_size is None else stage.global_batch_size

    def stage_seq_length(self, stage: StageConfig) -> int:
        """Positions per row in ``stage``: its own seq_length, else model.seq_length."""
        return self.model.seq_length if stage.seq_length is None else stage.seq_length

    def stage(self, name: str) -> StageConfig:
        for s in self.stages:
            if s.name == name:
                return s
        raise ConfigError(f"no stage named {name!r}; stages: {[s.name for s in self.stages]}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def dump(self, path: Path) -> None:
        """Write the resolved config as YAML (temporary name, then rename)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        tmp.replace(path)


# --------------------------------------------------------------------------------------------
# loading


def _positive(obj, *names):
    for n in names:
        v = getattr(obj, n)
        if v <= 0:
            raise ConfigError(f"{type(obj).__name__}.{n}={v} must be > 0")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, args[0], f"{where}.{i}") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if not math.isfinite(f) or f != int(f):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported field type {tp}")


def _build(cls, raw: Any, where: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.0)
            raise ConfigError(f"unknown config key '{path}'" + (f"; did you mean '{close[0]}'?" if close else ""))
        kwargs[key] = _coerce(value, hints[key], path)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}" if where else str(e)) from None


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node: Any = tree
    for i, p in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            try:
                idx = int(p)
            except ValueError:
                matches = [j for j, s in enumerate(node) if isinstance(s, dict) and s.get("name") == p]
                if not matches:
                    raise ConfigError(f"override {dotted}: no list element {p!r}") from None
                idx = matches[0]
            if not -len(node) <= idx < len(node):
                raise ConfigError(f"override {dotted}: index {idx} out of range (have {len(node)})")
            if last:
                node[idx] = value
            else:
                node = node[idx]
        else:
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted}: {'.'.join(parts[:i]) or 'config'} is "
                                  f"{node!r}, not a mapping")
            if last:
                node[p] = value
            else:
                if node.get(p) is None:  # absent or YAML null: the override creates the section
                    node[p] = {}
                node = node[p]


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, val = text.split("=", 1)
    return key.strip(), yaml.safe_load(val) if val.strip() else ""


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None,
                raw: Optional[dict] = None) -> RunConfig:
    """Read a YAML recipe, apply dotted overrides, and validate into a RunConfig."""
    tree: dict = {}
    if raw is not None:
        tree = copy.deepcopy(raw)  # overrides and the legacy-key migration edit the tree
    elif path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
    defaults = tree.pop("defaults", None) if isinstance(tree, dict) else None
    if defaults is not None:  # a recipe may inherit from another file next to it
        base = yaml.safe_load((Path(path).parent / defaults).read_text()) or {}
        tree = _merge(base, tree)
    where = str(path) if path is not None else "config"
    migrate_legacy(tree, where=where)
    for o in overrides or []:
        k, v = parse_override(o)
        new = legacy_key(k)
        if new is not None:
            warnings.warn(f"override {k} is deprecated, write {new} (read for one more release)",
                          DeprecationWarning, stacklevel=2)
            k = new
        _set_dotted(tree, k, v)
    return _build(RunConfig, tree, "")


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
