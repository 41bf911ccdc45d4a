"""The checks of ``megavlm selftest``: each returns a ``Check`` that passed, was skipped (an
optional piece is missing: which one and what was skipped) or failed (a wrong result).

Why here and not in tests/: a user's cluster has megavlm installed, maybe not its test tree, and
must not need pytest to learn whether the install works. The checks call the library code the
tests call (megavlm.kernels, megavlm.ops, megavlm.bench.masked_ce, megavlm.bench.throughput), at
small sizes on a CPU and at the recipe's sizes on a GPU.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional

import torch

from megavlm.selftest.environment import Environment

Status = Literal["passed", "skipped", "failed", "interrupted"]
SUBPROCESS_TIMEOUT_S = 300
"""Every subprocess of the selftest is bounded by this (a one-shot acceptance run cannot wait longer)."""
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Check:
    name: str
    status: Status
    detail: str
    seconds: float = 0.0
    artifacts: list[str] = field(default_factory=list)


def timed(fn: Callable[..., Check]) -> Callable[..., Check]:
    def wrapper(*args, **kwargs) -> Check:
        start = time.perf_counter()
        try:
            check = fn(*args, **kwargs)
        except Exception as e:  # a crash inside a check is a failure of that check, reported
            check = Check(fn.__name__, "failed", f"{type(e).__name__}: {e}")
        check.seconds = time.perf_counter() - start
        return check
    wrapper.__name__ = fn.__name__
    return wrapper


@timed
def masked_ce_kernel(env: Environment, size: str) -> Check:
    """Fused masked cross-entropy vs the reference: loss, count and both gradients."""
    from megavlm.selftest.kernel_check import cases, compare, run_worker

    name = "masked-CE kernel vs reference"
    if not env.pieces["Triton"].importable:
        return Check(name, "skipped", "Triton is not installed: the fused kernel was not checked "
                                      "(training uses the reference)")
    device = "cuda" if env.has_cuda else "cpu"
    results, error = run_worker(device, size)
    if error:
        return Check(name, "failed", error)
    problems = [p for r in results for p in compare(r)]
    shapes = ", ".join(f"{c.rows}x{c.dim}x{c.vocab} {c.dtype}" for c in cases(device, size))
    how = "compiled" if device == "cuda" else "Triton interpreter"
    if problems:
        return Check(name, "failed", "; ".join(problems))
    worst = max(max(r["loss_rel"], r["grad_hidden_rel"], r["grad_weight_rel"]) for r in results)
    return Check(name, "passed", f"{how} on {device}: {shapes}; largest relative difference "
                                 f"{worst:.1e}")


@timed
def te_spec(env: Environment, size: str) -> Check:
    """The TE layer spec against the local one on the same weights (tests/model/test_te_spec.py)."""
    name = "TE vs local layer spec"
    if not env.te_usable:
        why = ("Transformer Engine is not installed" if not env.pieces["Transformer Engine"].present
               else "Transformer Engine is installed but not usable (no CUDA GPU or it failed to load)")
        return Check(name, "skipped", f"{why}: TE-vs-local comparison and FP8 not run")
    test = ROOT / "tests" / "model" / "test_te_spec.py"
    if not test.exists():
        return Check(name, "skipped", f"{test} is not here (megavlm installed without its tests)")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", str(test)],
                         cwd=ROOT, capture_output=True, text=True, check=False,
                         timeout=SUBPROCESS_TIMEOUT_S)
    tail = (out.stdout.strip().splitlines() or ["no output"])[-1]
    return Check(name, "passed" if out.returncode == 0 else "failed", f"pytest -m gpu: {tail}")


def _bench_shape(env: Environment, size: str):
    from megavlm.bench.masked_ce import Shape

    if size == "full":  # the case: N = 8 x 1024, d 2048, V 50432, bf16, 71 % masked
        return Shape(8, 1024, 729, 2048, 50432, "bfloat16" if env.has_cuda else "float32")
    return Shape(1, 64, 45, 16, 64, "float32")


@timed
def masked_ce_benchmark(env: Environment, size: str, out_dir: Path) -> Check:
    """Time and peak memory of the loss variants; they must agree on the loss."""
    from megavlm.bench.artifact import write_report
    from megavlm.bench.masked_ce import machine_info, render, run_cpu, run_gpu

    name = "masked-CE benchmark"
    shape = _bench_shape(env, size)
    info = machine_info()
    if env.has_cuda:
        results, extra = run_gpu(shape, repeats=20 if size == "full" else 3)
        method = "torch.cuda.max_memory_allocated minus memory_allocated before one warm iteration"
        tag = env.slug()
    else:
        results, extra = run_cpu(shape, repeats=5 if size == "full" else 1)
        method = "per variant in a fresh subprocess: VmHWM - VmRSS around one warm iteration"
        tag = "cpu"
    command = "megavlm selftest (masked-CE benchmark)"
    text = render("gpu" if env.has_cuda else "cpu", shape, results, {**info, **extra}, command,
                  method, "naive")
    path = write_report(out_dir, tag, "selftest-masked-ce", text)
    ran = [r for r in results if r.loss is not None]
    skipped = [f"{r.variant} ({r.note})" for r in results if r.loss is None]
    base = next((r for r in ran if r.variant == "naive"), None)
    if base is None:
        return Check(name, "failed", "the naive baseline did not run", artifacts=[str(path)])
    tol = 2e-2 if shape.dtype != "float32" else 1e-4
    wrong = [f"{r.variant}: loss {r.loss:.6g} vs naive {base.loss:.6g}" for r in ran
             if not math.isclose(r.loss, base.loss, rel_tol=tol)]
    lines = []
    for r in ran:
        if r is not base and r.median_ms and base.median_ms:
            mem = (f", {base.peak_mib / r.peak_mib:.1f}x less peak memory"
                   if r.peak_mib and base.peak_mib else "")
            lines.append(f"{r.variant} {base.median_ms / r.median_ms:.2f}x naive's speed{mem}")
    detail = "; ".join(lines) or "measured"
    if skipped:
        detail += "; not run: " + ", ".join(skipped)
    if wrong:
        return Check(name, "failed", "losses disagree: " + "; ".join(wrong),
                     artifacts=[str(path)])
    return Check(name, "passed", detail, artifacts=[str(path)])


def _packed_attention(r) -> str:
    """Which kernel attended inside the documents of the packed rows."""
    if not r.document_masks:
        return "no document boundaries reached the model"
    if r.backend != "local":
        return f"document boundaries, {r.backend} attention"
    from megavlm.model.attention import _varlen_for

    why = None
    if torch.cuda.is_available():
        _, why = _varlen_for("cuda", torch.cuda.current_device())
        if why is None and r.case.precision == "fp32":
            why = "fp32 inputs"
    else:
        why = "no CUDA"
    return ("document boundaries, torch varlen flash attention" if why is None else
            f"document boundaries, SDPA per document group: {why}")


@timed
def throughput(env: Environment, size: str, out_dir: Path, config: Optional[Path] = None) -> Check:
    """A short training run of the text and image-text stages through the real engine, with MFU."""
    from megavlm.bench import throughput as tp
    from megavlm.config import load_config
    from megavlm.parallel.state import Parallel

    name = "training throughput"
    if config is None:
        config = ROOT / "launch" / "configs" / ("dclm-1b.yaml" if size == "full" else "tiny.yaml")
    if not config.exists():
        return Check(name, "skipped", f"recipe {config} is not here (pass --config)")
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        return Check(name, "skipped", "selftest measures one process; use `megavlm bench "
                                      "throughput` under torchrun for several")
    steps, warmup = (10, 3) if size == "full" else (2, 1)
    # Seconds per case, not minutes: a global batch of 4 microbatches of the recipe's micro-batch
    # (the step's shape per microbatch, hence MFU, is the recipe's).
    overrides = (["train.global_batch_size=32"] if size == "full"
                 else ["train.global_batch_size=8", "train.micro_batch_size=8"])
    base = load_config(config, overrides)
    cuda = env.has_cuda
    precisions = ["bf16", "fp8-delayed"] if cuda else ["fp32"]
    info = tp.hardware(cuda)
    parallel = Parallel.initialize(base.parallel, base.seed)
    results = []
    try:
        for stage in ("text", "packed", "image-text"):  # packed: several documents per row
            for prec in precisions:
                case = tp.Case(stage, prec, "synthetic")
                why = tp.unavailable(case, cuda, env.te_usable)
                results.append(tp.Result(case, skipped=why) if why else
                               tp.run_case(base, case, parallel, steps, warmup))
        world = parallel.world_size
    finally:
        parallel.destroy()
    command = f"megavlm selftest (throughput: {config.name}, {steps} steps after {warmup})"
    md = tp.render(results, base, info, command, world, steps, warmup)
    from megavlm.bench.artifact import write_report

    path = write_report(out_dir, env.slug(), "selftest-throughput", md)
    peak_of = "bf16" if cuda else "fp32"
    parts, wrong = [], []
    for r in results:
        label = f"{r.case.stage} {r.case.precision}"
        if r.skipped:
            parts.append(f"{label} not run ({r.skipped})")
            continue
        if not (r.last_loss is not None and math.isfinite(r.last_loss)
                and r.tokens_per_s_per_gpu > 0):
            wrong.append(f"{label}: loss {r.last_loss}, {r.tokens_per_s_per_gpu} tokens/s")
        u = tp.mfu(r, info, peak_of)
        parts.append(f"{label} {r.tokens_per_s_per_gpu:,.0f} tok/s"
                     + (f", MFU {u:.1%} of {peak_of} peak" if u is not None else "")
                     + (f" ({_packed_attention(r)})" if r.case.stage == "packed" else ""))
    if wrong:
        return Check(name, "failed", "; ".join(wrong), artifacts=[str(path)])
    return Check(name, "passed", "; ".join(parts), artifacts=[str(path)])
