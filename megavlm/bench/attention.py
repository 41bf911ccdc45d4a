"""``megavlm bench attention``: packed-row attention, the old dense-mask path against the new one.

What is measured: one DCLM-1B-width layer's attention (d 2048, 16 heads of 128, seq 2048, 8
documents per row, micro-batch 1 by default), forward + backward, with the same inputs and weights
on both paths. ``--part core`` (default) times the core-attention seat alone — q, k, v → context,
the only thing that differs between the paths; ``--part attention`` times the whole self-attention
sublayer of the DCLM block (QKV projection, full-width qk-norm, RoPE, core attention, output
projection; no MLP), whose GEMMs are the same on both paths.

* dense — the old training path: megatron-core's ``DotProductAttention`` on [S, B, h, d] with the
  [B, 1, S, S] block-causal mask (megavlm.model.reference.document_mask), built once outside the
  measured iteration as the old step built it once per microbatch for all layers;
* packed — the new path: the rows flattened to [B·S, h, d] (thd) with their document boundaries
  (megavlm.model.attention.document_boundaries) into :class:`~megavlm.model.attention.SDPAttention`.

Document lengths are drawn from a seeded generator (distinct lengths, so the packed path runs one
SDPA call per document and equal-length batching does not flatter it).

Memory on CPU: each path in a fresh subprocess; the peak resident set that one warm iteration adds
(VmHWM − VmRSS, the high-water mark reset through /proc/self/clear_refs) with glibc's mmap
threshold pinned at 128 KiB so that freed tensors leave the resident set
(megavlm.bench.masked_ce.peak_rss_mib, the same method as the masked-CE benchmark). Time on CPU:
one more subprocess, the paths alternating iteration by iteration (the machine may be shared),
median. On CUDA: ``torch.cuda.max_memory_allocated`` above the allocation before the iteration,
and CUDA-event time, median.

``--json`` prints exactly one object: ``{"seq", "docs_per_row", "dense": {"ms", "peak_mib"},
"packed": {"ms", "peak_mib"}}``; without it a dated markdown report is written under
``benchmarks/`` (megavlm.bench.artifact) unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

PATHS = ("dense", "packed")


@dataclass(frozen=True)
class Case:
    seq: int = 2048
    docs_per_row: int = 8
    batch: int = 1
    hidden: int = 2048
    heads: int = 16
    part: str = "core"
    seed: int = 0

    def __post_init__(self):
        if self.part not in ("core", "attention"):
            raise ValueError(f"--part must be core or attention, got {self.part!r}")
        if not 1 <= self.docs_per_row <= self.seq:
            raise ValueError(f"--docs-per-row={self.docs_per_row} must be in [1, seq={self.seq}]")
        if self.hidden % self.heads:
            raise ValueError(f"--hidden={self.hidden} is not divisible by --heads={self.heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def document_lengths(case: Case) -> list[list[int]]:
    """Per row, ``docs_per_row`` document lengths summing to ``seq`` (seeded, mostly distinct)."""
    g = torch.Generator().manual_seed(case.seed)
    rows = []
    for _ in range(case.batch):
        cuts = torch.randperm(case.seq - 1, generator=g)[:case.docs_per_row - 1] + 1
        edges = [0] + sorted(cuts.tolist()) + [case.seq]
        rows.append([b - a for a, b in zip(edges, edges[1:])])
    return rows


def boundaries(case: Case) -> torch.Tensor:
    out = [0]
    for lengths in document_lengths(case):
        for n in lengths:
            out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32)


def _config(case: Case, dtype: torch.dtype):
    from megavlm.config import ModelConfig, ParallelConfig
    from megavlm.model.specs import transformer_config

    model = ModelConfig(hidden_size=case.hidden, num_attention_heads=case.heads,
                        ffn_hidden_size=4 * case.hidden, seq_length=case.seq)
    return model, transformer_config(model, ParallelConfig(), dtype=dtype, batch_p2p_comm=False)


def build(case: Case, path: str, device: str, dtype: torch.dtype) -> Callable[[], float]:
    """One forward + backward of ``path`` on fixed inputs; returns a checksum of the output."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megavlm.model.attention import SDPAttention, document_boundaries
    from megavlm.model.reference import document_mask

    model, tc = _config(case, dtype)
    B, S, H, D = case.batch, case.seq, case.heads, case.head_dim
    cu = boundaries(case)
    g = torch.Generator().manual_seed(case.seed + 1)
    core_cls = DotProductAttention if path == "dense" else SDPAttention
    mask = document_mask(cu.to(device), B, S) if path == "dense" else None
    params = None if path == "dense" else document_boundaries(cu, B * S, device, row_length=S)

    if case.part == "core":
        core = core_cls(tc, 1, AttnMaskType.causal, "self").to(device)
        qkv = [torch.randn(S, B, H, D, generator=g).to(device, dtype).requires_grad_()
               for _ in range(3)]

        def run() -> float:
            for t in qkv:
                t.grad = None
            if path == "dense":
                out = core(*qkv, mask, attn_mask_type=AttnMaskType.causal)
            else:
                thd = [t.transpose(0, 1).reshape(B * S, H, D) for t in qkv]
                out = core(*thd, None, attn_mask_type=AttnMaskType.causal, packed_seq_params=params)
            out.float().square().mean().backward()
            return float(out.detach().float().abs().mean())

        return run

    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.spec_utils import build_module

    from megavlm.model.block import dclm_block
    from megavlm.model.norms import GainLayerNorm
    from megavlm.model.vlm import rotary_embedding

    spec = dclm_block(norm=GainLayerNorm, column_linear=ColumnParallelLinear,
                      row_linear=RowParallelLinear, core_attention=core_cls, qk_norm=True)
    attn = build_module(spec.submodules.self_attention, config=tc, layer_number=1)
    with torch.no_grad():
        for p in attn.parameters():  # same weights on both paths (perform_initialization=False)
            p.copy_(torch.randn(p.shape, generator=g) * 0.02 if p.ndim > 1
                    else 1 + 0.1 * torch.randn(p.shape, generator=g))
    attn = attn.to(device)
    x = torch.randn(S, B, case.hidden, generator=g).to(device, dtype).requires_grad_()
    pos = torch.cat([torch.arange(n) for row in document_lengths(case) for n in row]).view(B, S)
    if path == "dense":
        rope = rotary_embedding(pos.to(device), D, model.rope_base)
    else:
        rope = rotary_embedding(pos.reshape(1, B * S).to(device), D, model.rope_base)

    def run() -> float:
        x.grad = None
        attn.zero_grad(set_to_none=True)
        if path == "dense":
            out, _ = attn(x, attention_mask=mask, rotary_pos_emb=rope)
        else:
            flat = x.transpose(0, 1).reshape(B * S, 1, case.hidden)
            out, _ = attn(flat, attention_mask=None, rotary_pos_emb=rope, packed_seq_params=params)
        out.float().square().mean().backward()
        return float(out.detach().float().abs().mean())

    return run


def _init_parallel(seed: int) -> None:
    from megavlm.config import ParallelConfig
    from megavlm.parallel.state import Parallel

    Parallel.initialize(ParallelConfig(), seed=seed)


# ------------------------------------------------------------------------------------------ CPU

def cpu_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs inside a subprocess: one path's peak memory, or the times of both paths."""
    from megavlm.bench.masked_ce import peak_rss_mib

    case = Case(**spec["case"])
    _init_parallel(case.seed)
    if spec["measure"] == "memory":
        run = build(case, spec["path"], "cpu", torch.float32)
        check = run()  # warm-up: lazy initialisation, first touch of the gradient buffers
        return {"peak_mib": peak_rss_mib(run), "check": check}
    runs = {p: build(case, p, "cpu", torch.float32) for p in PATHS}
    checks = {p: r() for p, r in runs.items()}
    times: dict[str, list[float]] = {p: [] for p in PATHS}
    for _ in range(spec["repeats"]):
        for p, r in runs.items():
            start = time.perf_counter()
            r()
            times[p].append((time.perf_counter() - start) * 1e3)
    return {"times_ms": times, "check": checks, "threads": torch.get_num_threads()}


def _run_worker(spec: dict[str, Any], extra_env: dict[str, str]) -> dict[str, Any]:
    import megavlm

    env = dict(os.environ, **extra_env)
    root = str(Path(megavlm.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    out = subprocess.run([sys.executable, "-m", "megavlm.bench.attention", "--worker", json.dumps(spec)],
                         env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"attention benchmark worker ({spec['measure']}) failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_cpu(case: Case, repeats: int) -> dict[str, Any]:
    from megavlm.bench.masked_ce import MEMORY_ENV

    timed = _run_worker({"case": asdict(case), "measure": "time", "repeats": repeats}, {})
    out: dict[str, Any] = {"threads": timed["threads"]}
    for p in PATHS:
        mem = _run_worker({"case": asdict(case), "measure": "memory", "path": p}, MEMORY_ENV)
        t = timed["times_ms"][p]
        out[p] = {"ms": statistics.median(t), "min_ms": min(t), "max_ms": max(t),
                  "peak_mib": mem["peak_mib"], "check": timed["check"][p]}
    return out


# ------------------------------------------------------------------------------------------ GPU

def run_cuda(case: Case, repeats: int, dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    import gc

    _init_parallel(case.seed)
    out: dict[str, Any] = {}
    for p in PATHS:
        run = build(case, p, "cuda", dtype)
        check = run()
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - before) / 2 ** 20
        times = []
        for _ in range(repeats):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            run()
            end.record()
            torch.cuda.synchronize()
            times.append(begin.elapsed_time(end))
        out[p] = {"ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
                  "peak_mib": peak, "check": check}
        del run
        torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------ reporting

def machine_info(device: str) -> dict[str, Any]:
    from megavlm.bench.artifact import cpu_model, load_average

    info: dict[str, Any] = {"CPU": cpu_model(), "logical CPUs": os.cpu_count(),
                            "load average at start (1/5/15 min)": load_average(),
                            "python": platform.python_version(), "torch": torch.__version__}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update({"GPU": props.name, "CUDA": torch.version.cuda})
    return info


def render(case: Case, res: dict[str, Any], info: dict[str, Any], command: str, device: str) -> str:
    import datetime as _dt

    d, p = res["dense"], res["packed"]
    what = ("the core-attention seat (q, k, v → context)" if case.part == "core" else
            "the self-attention sublayer (QKV GEMM, qk-norm, RoPE, core attention, out GEMM; no MLP)")
    mem = ("per path in a fresh subprocess: VmHWM − VmRSS around one warm iteration (reset via "
           "/proc/self/clear_refs), glibc MALLOC_MMAP_THRESHOLD_=128 KiB" if device == "cpu" else
           "torch.cuda.max_memory_allocated above the allocation before the iteration")
    lines = [f"# Packed-row attention: dense mask vs document boundaries, {device.upper()}, "
             f"{_dt.date.today().isoformat()}", "", f"Command: `{command}`", "", "## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    if "threads" in res:
        lines.append(f"- torch threads: {res['threads']}")
    lines += ["", "## Case", "",
              f"- {what} of one DCLM-1B-width layer: d {case.hidden}, {case.heads} heads of "
              f"{case.head_dim}, micro-batch {case.batch}, seq {case.seq}, {case.docs_per_row} "
              f"documents per row (lengths {document_lengths(case)})",
              f"- dtype {'fp32' if device == 'cpu' else 'bf16'}; one iteration = forward + backward",
              "- dense: megatron-core DotProductAttention with the [B, 1, S, S] document mask (the old "
              "training path); packed: rows flattened to thd with cu_seqlens into SDPAttention",
              f"- peak memory: {mem}",
              "- time: " + ("one subprocess, the paths alternating iteration by iteration, median"
                            if device == "cpu" else "CUDA events, median"), "",
              "## Results", "",
              "| path | median ms | min ms | max ms | peak MiB | output check |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name in PATHS:
        r = res[name]
        lines.append(f"| {name} | {r['ms']:.1f} | {r['min_ms']:.1f} | {r['max_ms']:.1f} | "
                     f"{r['peak_mib']:.1f} | {r['check']:.6f} |")
    lines += ["", f"packed vs dense: **{d['ms'] / p['ms']:.2f}x faster** (medians), "
              f"**{d['peak_mib'] / max(p['peak_mib'], 1e-9):.2f}x less peak memory**.", "",
              "The output checks (mean |output|) agree: both paths compute the same attention."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        print(json.dumps(cpu_worker(json.loads(argv[1]))))
        return 0
    ap = argparse.ArgumentParser(prog="megavlm bench attention", description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--docs-per-row", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1, help="rows per microbatch")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--part", choices=["core", "attention"], default="core")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--json", action="store_true", help="print one JSON object, write no report")
    ap.add_argument("--out-dir", default="benchmarks")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    case = Case(seq=args.seq, docs_per_row=args.docs_per_row, batch=args.batch, hidden=args.hidden,
                heads=args.heads, part=args.part)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda needs a CUDA GPU")
    info = machine_info(device)
    res = run_cpu(case, args.repeats) if device == "cpu" else run_cuda(case, args.repeats)
    if args.json:
        print(json.dumps({"seq": case.seq, "docs_per_row": case.docs_per_row,
                          "dense": {"ms": res["dense"]["ms"], "peak_mib": res["dense"]["peak_mib"]},
                          "packed": {"ms": res["packed"]["ms"], "peak_mib": res["packed"]["peak_mib"]}}))
        return 0
    command = "megavlm bench attention " + " ".join(argv)
    text = render(case, res, info, command.strip(), device)
    if not args.no_write:
        from megavlm.bench.artifact import write_report

        name = "attention" if case.part == "core" else "attention-sublayer"
        print(f"wrote {write_report(args.out_dir, device, name, text)}")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
