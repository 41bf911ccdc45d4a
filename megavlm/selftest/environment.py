"""What this machine has: the first section of a selftest report.

Why its own module: a report that says "0.42 MFU" is only useful next to the torch, CUDA, NCCL,
GPU and library versions it ran with, and a user on a new cluster first needs to know which
optional pieces (Transformer Engine, apex, Triton, lm-eval, Liger, Cut Cross-Entropy) megavlm will
find and which paths (attention, masked cross-entropy) it will take. Everything here only looks:
it never installs, never reaches the network, and imports GPU libraries inside ``try`` blocks
catching ``Exception`` (Transformer Engine raises OSError without a driver).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
from dataclasses import dataclass, field
from typing import Optional

import torch

OPTIONAL = (
    # (label, distribution name, importable module)
    ("Transformer Engine", "transformer-engine", "transformer_engine"),
    ("apex", "apex", "apex"),
    ("Triton", "triton", "triton"),
    ("megatron-core", "megatron-core", "megatron.core"),
    ("lm-eval", "lm-eval", "lm_eval"),
    ("liger-kernel", "liger-kernel", "liger_kernel"),
    ("cut-cross-entropy", "cut-cross-entropy", "cut_cross_entropy"),
)


@dataclass(frozen=True)
class Piece:
    label: str
    version: Optional[str]
    """Installed distribution version, None when not installed."""
    importable: bool
    """``find_spec`` finds the module (it is not imported here)."""

    @property
    def present(self) -> bool:
        return self.version is not None or self.importable

    def describe(self) -> str:
        if not self.present:
            return "not installed"
        version = self.version or "version unknown"
        return version if self.importable else f"{version} (distribution found, module missing)"


@dataclass
class Environment:
    python: str
    torch: str
    cuda: Optional[str]
    nccl: Optional[str]
    gpus: list[tuple[str, float]] = field(default_factory=list)
    """(name, memory GiB) per visible device."""
    pieces: dict[str, Piece] = field(default_factory=dict)
    te_usable: bool = False
    attention: str = ""
    masked_ce: str = ""
    masked_ce_error: Optional[str] = None

    @property
    def has_cuda(self) -> bool:
        return bool(self.gpus)

    def slug(self) -> str:
        """Hardware name for report files: the GPU model, or ``cpu``."""
        if not self.gpus:
            return "cpu"
        from megavlm.bench.throughput import gpu_peak

        key, _ = gpu_peak(self.gpus[0][0])
        name = (key or self.gpus[0][0]).lower()
        return "".join(c if c.isalnum() else "-" for c in name).strip("-")

    def markdown(self) -> list[str]:
        gpu = (", ".join(f"{n} ({m:.0f} GiB)" for n, m in self.gpus) if self.gpus
               else "none (CPU run: small sizes)")
        lines = [f"- python: {self.python}", f"- torch: {self.torch}",
                 f"- CUDA: {self.cuda or 'none'}; NCCL: {self.nccl or 'none'}",
                 f"- GPUs: {len(self.gpus)}: {gpu}"]
        lines += [f"- {p.label}: {p.describe()}" for p in self.pieces.values()]
        lines += [f"- Transformer Engine usable (installed + CUDA): {self.te_usable}",
                  f"- attention path: {self.attention}",
                  f"- masked cross-entropy path: {self.masked_ce}"]
        return lines


def _piece(label: str, dist: str, module: str) -> Piece:
    try:
        version: Optional[str] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        version = None
    try:
        importable = importlib.util.find_spec(module) is not None
    except Exception:  # a parent package that fails to import
        importable = False
    return Piece(label, version, importable)


def attention_path(backend: str) -> str:
    """The core-attention module the layer spec of ``backend`` puts into every layer."""
    from megavlm.model.specs import dclm_local_layer_spec, dclm_te_layer_spec

    try:
        spec = dclm_te_layer_spec() if backend == "te" else dclm_local_layer_spec()
        core = spec.submodules.self_attention.submodules.core_attention
        core = getattr(core, "module", core)
        name = f"{core.__module__}.{core.__qualname__}"
    except Exception as e:  # a spec that cannot be built here is itself worth reporting
        name = f"unknown ({type(e).__name__}: {e})"
    return f"{backend} layer spec: {name}"


def detect(model_backend: str = "auto") -> Environment:
    """Look at the machine; never raises for a missing or broken optional piece."""
    from megavlm.model.specs import select_backend, te_usable
    from megavlm.ops.masked_ce import masked_ce_path

    cuda_ok = bool(torch.version.cuda) and torch.cuda.is_available()
    env = Environment(python=platform.python_version(), torch=torch.__version__,
                      cuda=torch.version.cuda, nccl=None)
    if cuda_ok:
        try:
            env.nccl = ".".join(str(v) for v in torch.cuda.nccl.version())
        except Exception as e:
            env.nccl = f"unknown ({type(e).__name__})"
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            env.gpus.append((props.name, props.total_memory / 2 ** 30))
    env.pieces = {label: _piece(label, dist, module) for label, dist, module in OPTIONAL}
    env.te_usable = te_usable()
    try:
        backend = select_backend(model_backend)
        why = ("Transformer Engine and a CUDA GPU are usable" if backend == "te"
               else "Transformer Engine is not usable here" if model_backend == "auto"
               else f"model.backend={model_backend}")
        env.attention = f"{attention_path(backend)} ({why})"
    except RuntimeError as e:
        env.attention = f"cannot run: {e}"
    device = "cuda" if cuda_ok else "cpu"
    dtype = torch.bfloat16 if cuda_ok else torch.float32
    try:
        choice = masked_ce_path(device, dtype)
        env.masked_ce = f"{choice.path} on {device} {str(dtype).replace('torch.', '')} ({choice.reason})"
    except (RuntimeError, ValueError) as e:  # a forced path that cannot run, a bad override
        env.masked_ce_error = str(e)
        env.masked_ce = f"ERROR: {e}"
    return env
