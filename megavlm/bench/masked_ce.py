"""Benchmark of the masked linear cross-entropy: time and peak memory of forward + backward.

Why: caption rows are ~71 % image positions without loss; the loss should cost only what the text
positions need. This measures that claim on caption-shaped batches (each row of ``--seq``
positions starts with ``--image`` masked positions) and writes the result as a dated markdown
artifact under ``--out-dir`` with the command and the machine.

CPU case (always): megavlm's reference, which gathers the loss rows before the projection, against
naive full logits + ``F.cross_entropy(ignore_index=-100)``. Peak memory: each variant in its own
subprocess, the high-water mark of the resident set (VmHWM, reset through /proc/self/clear_refs
after a warm-up iteration) minus the resident set just before the measured iteration, with
glibc's mmap threshold pinned so that freed tensors leave the resident set. Time: one more
subprocess under the default allocator settings, the variants taking turns iteration by
iteration (the machine may be shared), median per variant.

GPU case (when CUDA is available): the fused Triton kernel (default tiling, plus the tilings of
``--fused-tiles`` so that one GPU run can also choose the default), the naive path, the reference,
Liger's fused linear cross-entropy and Apple's Cut Cross-Entropy (the last two imported lazily,
skipped with a note when missing), in one process; peak memory is
``torch.cuda.max_memory_allocated`` above what was allocated before the iteration (gradients
included), time is CUDA-event median.

Run: ``python -m megavlm.bench.masked_ce [--case cpu|gpu|all]`` (``megavlm bench masked-ce``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from megavlm.bench.artifact import machine_info, write_report
import torch.nn.functional as F

CPU_VARIANTS = ("naive", "masked_reference")
GPU_VARIANTS = ("naive", "masked_reference", "fused", "liger", "cce")
LossFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]
"""Summed loss of one variant on the inputs of ``make_inputs``."""


@dataclass(frozen=True)
class Shape:
    """A caption-shaped batch: ``batch`` rows of ``seq`` positions, the first ``image`` masked."""

    batch: int
    seq: int
    image: int
    dim: int
    vocab: int
    dtype: str

    @property
    def rows(self) -> int:
        return self.batch * self.seq

    @property
    def masked_fraction(self) -> float:
        return self.image / self.seq


@dataclass
class Result:
    variant: str
    median_ms: Optional[float] = None
    min_ms: Optional[float] = None
    max_ms: Optional[float] = None
    peak_mib: Optional[float] = None
    loss: Optional[float] = None
    note: str = ""


def make_inputs(shape: Shape, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    dtype = getattr(torch, shape.dtype)
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(shape.rows, shape.dim, generator=g).to(device=device, dtype=dtype)
    weight = (torch.randn(shape.vocab, shape.dim, generator=g) / shape.dim ** 0.5).to(
        device=device, dtype=dtype)
    labels = torch.randint(0, shape.vocab, (shape.rows,), generator=g).to(device)
    mask = torch.ones(shape.batch, shape.seq, dtype=torch.bool)
    mask[:, :shape.image] = False
    mask = mask.reshape(-1).to(device)
    return dict(hidden=hidden.requires_grad_(), weight=weight.requires_grad_(), labels=labels,
                mask=mask, ignore_labels=labels.masked_fill(~mask, -100))


def loss_fn(variant: str) -> LossFn:
    """The summed loss of one variant; imports optional packages only when asked for."""
    if variant == "naive":
        def naive(x: dict[str, torch.Tensor]) -> torch.Tensor:
            logits = x["hidden"] @ x["weight"].t()
            return F.cross_entropy(logits.float(), x["ignore_labels"], ignore_index=-100,
                                   reduction="sum")
        return naive
    if variant == "masked_reference":
        from megavlm.ops.masked_ce import masked_cross_entropy_reference
        return lambda x: masked_cross_entropy_reference(x["hidden"], x["weight"], x["labels"],
                                                        x["mask"])[0]
    if variant.startswith("fused"):  # "fused" (default tiles) or "fused:BN,BV,BD,WARPS,STAGES"
        from megavlm.kernels.masked_ce import TileConfig, masked_linear_cross_entropy
        config = None
        if ":" in variant:
            bn, bv, bd, warps, stages = (int(v) for v in variant.split(":", 1)[1].split(","))
            config = TileConfig(block_n=bn, block_v=bv, block_d=bd, num_warps=warps,
                                num_stages=stages)
        return lambda x: masked_linear_cross_entropy(x["hidden"], x["weight"], x["labels"],
                                                     x["mask"], config=config)[0]
    if variant == "liger":
        from liger_kernel.transformers.fused_linear_cross_entropy import (
            LigerFusedLinearCrossEntropyLoss)
        module = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="sum")

        def liger(x: dict[str, torch.Tensor]) -> torch.Tensor:
            out = module(x["weight"], x["hidden"], x["ignore_labels"])
            return out[0] if isinstance(out, tuple) else out
        return liger
    if variant == "cce":
        from cut_cross_entropy import linear_cross_entropy
        return lambda x: linear_cross_entropy(x["hidden"], x["weight"], x["ignore_labels"],
                                              ignore_index=-100, reduction="sum")
    raise ValueError(f"unknown variant {variant!r}")


def step(fn: LossFn, x: dict[str, torch.Tensor]) -> torch.Tensor:
    """One forward + backward from fresh gradients; returns the loss, still on its device (no
    host sync here: timed iterations on a GPU must not wait for the device inside the window)."""
    x["hidden"].grad = None
    x["weight"].grad = None
    loss = fn(x)
    loss.backward()
    return loss.detach()


# ----------------------------------------------------------------------------------------- CPU

def _proc_status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(match.group(1))


def peak_rss_mib(run: Callable[[], object]) -> float:
    """Peak resident memory that ``run()`` adds to this process, in MiB (Linux).

    Resets the high-water mark (VmHWM) to the current resident set through /proc/self/clear_refs,
    runs, and returns VmHWM minus the resident set before. Honest for torch's CPU tensors only if
    freed memory leaves the resident set: run under ``MEMORY_ENV``.
    """
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    before = _proc_status_kib("VmRSS")
    run()
    return (_proc_status_kib("VmHWM") - before) / 1024


def cpu_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs inside a subprocess: one variant's peak memory, or the times of all variants."""
    shape = Shape(**spec["shape"])
    x = make_inputs(shape, "cpu")
    if spec["measure"] == "memory":
        fn = loss_fn(spec["variant"])
        loss = float(step(fn, x))  # warm-up: lazy initialisation, first touch of the grads
        x["hidden"].grad = None
        x["weight"].grad = None
        return {"peak_mib": peak_rss_mib(lambda: step(fn, x)), "loss": loss}
    # Time: the variants take turns, iteration by iteration, so that load from other processes
    # on a shared machine falls on all of them alike.
    fns = {v: loss_fn(v) for v in spec["variants"]}
    losses = {v: float(step(fn, x)) for v, fn in fns.items()}
    times: dict[str, list[float]] = {v: [] for v in fns}
    for _ in range(spec["repeats"]):
        for v, fn in fns.items():
            start = time.perf_counter()
            step(fn, x)
            times[v].append((time.perf_counter() - start) * 1e3)
    return {"times_ms": times, "loss": losses, "threads": torch.get_num_threads()}


def _run_worker(spec: dict[str, Any], extra_env: dict[str, str]) -> dict[str, Any]:
    import megavlm
    env = dict(os.environ, **extra_env)
    root = str(Path(megavlm.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    out = subprocess.run([sys.executable, "-m", "megavlm.bench.masked_ce", "--worker",
                          json.dumps(spec)], env=env, capture_output=True, text=True, check=False,
                         timeout=300)  # bounded: the selftest waits on it
    if out.returncode != 0:
        raise RuntimeError(f"benchmark worker ({spec['measure']}) failed:\n"
                           f"{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# glibc: a fixed mmap threshold returns every tensor above 128 KiB to the OS when it is freed
# (the default threshold grows to 32 MiB after the first frees and would hide those in the heap).
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024), "MALLOC_TRIM_THRESHOLD_": str(128 * 1024)}


def run_cpu(shape: Shape, repeats: int) -> tuple[list[Result], dict[str, Any]]:
    spec = {"shape": asdict(shape), "repeats": repeats}
    timed = _run_worker(dict(spec, measure="time", variants=list(CPU_VARIANTS)), {})
    results = []
    for variant in CPU_VARIANTS:
        mem = _run_worker(dict(spec, measure="memory", variant=variant), MEMORY_ENV)
        t = timed["times_ms"][variant]
        results.append(Result(variant, statistics.median(t), min(t), max(t), mem["peak_mib"],
                              timed["loss"][variant]))
    return results, {"torch threads": timed["threads"]}


# ----------------------------------------------------------------------------------------- GPU

def run_gpu(shape: Shape, repeats: int, fused_tiles: Sequence[str] = ()
            ) -> tuple[list[Result], dict[str, Any]]:
    results = []
    x = make_inputs(shape, "cuda")
    variants = list(GPU_VARIANTS) + [f"fused:{tile}" for tile in fused_tiles]
    for variant in variants:
        try:
            fn = loss_fn(variant)
        except ImportError as e:  # liger-kernel / cut-cross-entropy not installed
            results.append(Result(variant, note=f"skipped: {e}"))
            continue
        try:
            loss = float(step(fn, x))  # the one host read of the loss, outside the timing
            step(fn, x)  # second warm-up: autotuning / compile caches
            x["hidden"].grad = None
            x["weight"].grad = None
            gc.collect()
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            step(fn, x)
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - before) / 2 ** 20
            times = []
            for _ in range(repeats):
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                begin.record()
                step(fn, x)
                end.record()
                torch.cuda.synchronize()
                times.append(begin.elapsed_time(end))
            results.append(Result(variant, statistics.median(times), min(times), max(times),
                                  peak, loss))
        except torch.cuda.OutOfMemoryError as e:
            results.append(Result(variant, note=f"out of memory: {str(e).splitlines()[0]}"))
        except Exception as e:  # a third-party kernel failing must not lose the other rows
            results.append(Result(variant, note=f"failed: {type(e).__name__}: {e}"[:200]))
        x["hidden"].grad = None
        x["weight"].grad = None
        torch.cuda.empty_cache()
    props = torch.cuda.get_device_properties(0)
    return results, {"GPU": props.name, "GPU memory GiB": round(props.total_memory / 2 ** 30, 1),
                     "CUDA": torch.version.cuda}


# ------------------------------------------------------------------------------------ reporting

def render(case: str, shape: Shape, results: list[Result], info: dict[str, Any], command: str,
           peak_method: str, baseline: str) -> str:
    today = _dt.date.today().isoformat()
    lines = [f"# Masked linear cross-entropy, {case.upper()}, {today}", "",
             f"Command: `{command}`", "", "## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines += ["", "## Case", "",
              f"- rows N = {shape.batch} x {shape.seq} = {shape.rows}; the first {shape.image} "
              f"positions of every row are masked ({100 * shape.masked_fraction:.1f} %), "
              f"{shape.batch * (shape.seq - shape.image)} loss tokens",
              f"- d = {shape.dim}, V = {shape.vocab}, dtype {shape.dtype}",
              "- one iteration = forward + backward, gradients for hidden states and weight",
              f"- peak memory: {peak_method}", "",
              "## Results", "",
              "| variant | median ms | min ms | max ms | peak MiB | loss sum | note |",
              "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]

    def fmt(v: Optional[float], spec: str) -> str:
        return "—" if v is None else format(v, spec)

    for r in results:
        lines.append(f"| {r.variant} | {fmt(r.median_ms, '.1f')} | {fmt(r.min_ms, '.1f')} | "
                     f"{fmt(r.max_ms, '.1f')} | {fmt(r.peak_mib, '.1f')} | {fmt(r.loss, '.3f')} | "
                     f"{r.note} |")
    base = next((r for r in results if r.variant == baseline and r.median_ms), None)
    if base is not None:
        lines += ["", f"## Ratios against {baseline} (same run)", "",
                  "| variant | speed-up (medians) | speed-up (minima) | peak memory reduction |",
                  "| --- | ---: | ---: | ---: |"]
        for r in results:
            if r is base or r.median_ms is None:
                continue
            mem = (f"{base.peak_mib / r.peak_mib:.2f}x" if r.peak_mib and base.peak_mib
                   else "—")
            lines.append(f"| {r.variant} | {base.median_ms / r.median_ms:.2f}x | "
                         f"{base.min_ms / r.min_ms:.2f}x | {mem} |")
    return "\n".join(lines) + "\n"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="megavlm bench masked-ce", description=__doc__.split("\n")[0])
    p.add_argument("--case", choices=("cpu", "gpu", "all"), default="all",
                   help="all: CPU always, GPU when CUDA is available")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--image", type=int, default=729, help="masked positions at the start of a row")
    p.add_argument("--cpu-dim", type=int, default=512)
    p.add_argument("--cpu-vocab", type=int, default=8192)
    p.add_argument("--gpu-dim", type=int, default=2048)
    p.add_argument("--gpu-vocab", type=int, default=50432)
    p.add_argument("--repeats", type=int, default=7, help="timed iterations per CPU variant")
    p.add_argument("--gpu-repeats", type=int, default=20, help="timed iterations per GPU variant")
    p.add_argument("--fused-tiles", default="64,128,64,4,3;128,256,64,8,3",
                   help="extra fused tilings to time on the GPU, 'BN,BV,BD,WARPS,STAGES;...' "
                        "(the default tiling always runs)")
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks"))
    p.add_argument("--no-write", action="store_true", help="print the markdown only")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print(json.dumps(cpu_worker(json.loads(args.worker))))
        return 0
    if not 0 <= args.image <= args.seq:
        p.error("--image must be between 0 and --seq")
    command = "python -m megavlm.bench.masked_ce " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    gpu = torch.cuda.is_available()
    if args.case == "gpu" and not gpu:
        p.error("--case gpu needs CUDA")
    info = machine_info(("triton",))  # before the runs: the load average is the machine's, not ours
    reports = []
    if args.case in ("cpu", "all"):
        shape = Shape(args.batch, args.seq, args.image, args.cpu_dim, args.cpu_vocab, "float32")
        results, extra = run_cpu(shape, args.repeats)
        reports.append(("cpu", render(
            "cpu", shape, results, {**info, **extra}, command,
            "per variant in a fresh subprocess: VmHWM - VmRSS around one warm iteration "
            "(reset via /proc/self/clear_refs), glibc MALLOC_MMAP_THRESHOLD_=128 KiB; time: "
            "one subprocess, the variants alternating iteration by iteration, median",
            "naive")))
    if args.case == "gpu" or (args.case == "all" and gpu):
        shape = Shape(args.batch, args.seq, args.image, args.gpu_dim, args.gpu_vocab, "bfloat16")
        tiles = [t.strip() for t in args.fused_tiles.split(";") if t.strip()]
        results, extra = run_gpu(shape, args.gpu_repeats, tiles)
        reports.append((_slug(extra["GPU"]), render(
            "gpu", shape, results, {**info, **extra}, command,
            "torch.cuda.max_memory_allocated minus memory_allocated before one warm iteration",
            "naive")))
    for tag, text in reports:
        print(text)
        if not args.no_write:
            print(f"wrote {write_report(args.out_dir, tag, 'masked-ce', text)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
