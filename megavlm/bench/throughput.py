"""``megavlm bench throughput``: tokens/s/GPU, TFLOP/s and MFU of real training steps.

Why: a user sizing a run needs the engine's speed on their hardware, stated so it compares with
published numbers. This trains a recipe's model through the real engine (StageTrainer: megatron
DDP, DistributedOptimizer, the pipeline schedule, the layer spec the run would use) for a few
steps per case and measures:

* **step time**: the interval between consecutive ``loader.next_step()`` calls — data, forward,
  backward, optimizer, loss reduction (which synchronises the GPU) and logging. Warm-up steps
  are dropped; the median and the total are reported.
* **data waiting**: the time spent inside ``loader.next_step()`` over the step time: how much of
  a step is blocked on the input pipeline.
* **tokens/s/GPU**: positions per step (global batch × sequence, image positions included) /
  step time / processes.
* **TFLOP/s and MFU**: model FLOPs of the rows actually fed (megavlm.model.flops: matmul FLOPs,
  training = 3 × forward, attention counted over the full row unless ``--attention causal``,
  logits only at loss positions, projector at image positions) / step time / processes, over the
  dense peak of the GPU (table below; FP8 runs are shown against both the BF16 and the FP8 peak).
  On a CPU there is no datasheet peak: MFU is given against the fp32 matmul rate measured on this
  machine at the start of the run, and labelled so.

Cases: stage ``text`` (rows of one text document each) and ``image-text`` (caption rows: the
recipe's ``num_patches`` image positions, SEP, then text to the end of the row), each in every
requested precision (BF16; FP8 through TE with delayed or current scaling; fp32 on CPU). Data is
synthetic by default — rows generated on the fly as a pure function of (seed, step), every row one
causal sequence, so no document mask — or ``--data real``: the recipe's own prepared data through
megavlm's StageLoader (rows packed with document masks). The data-path check (data waiting) is
the ``real`` figure; with synthetic rows it only bounds the cost of the benchmark's own generator.
The result is dated markdown under benchmarks/, named by the hardware, with the command.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import gc
import os
import re
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from megavlm.bench.artifact import load_average, machine_info, write_report

from megavlm.config import RunConfig, load_config
from megavlm.bench.synthetic import SyntheticSteps
from megavlm.data.batch import Batch, Sample
from megavlm.model import flops

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = ROOT / "launch" / "configs" / "tiny.yaml"

# Dense (no sparsity) tensor-core peaks in TFLOP/s from NVIDIA's datasheets; None = not supported.
# Order matters: the first key contained in the device name wins.
PEAK_TFLOPS: dict[str, dict[str, Optional[float]]] = {
    "H200 NVL": {"bf16": 835.5, "fp8": 1670.5},
    "H200": {"bf16": 989.4, "fp8": 1978.9},
    "H100 NVL": {"bf16": 835.5, "fp8": 1670.5},
    "H100 PCIe": {"bf16": 756.5, "fp8": 1513.0},
    "H100": {"bf16": 989.4, "fp8": 1978.9},  # SXM ("H100 80GB HBM3")
    "A100": {"bf16": 312.0, "fp8": None},
}


def gpu_peak(device_name: str) -> tuple[Optional[str], dict[str, Optional[float]]]:
    """(table key, peaks) of a CUDA device name; (None, {}) when it is not in the table."""
    for key, peaks in PEAK_TFLOPS.items():
        if key.lower() in device_name.lower():
            return key, peaks
    return None, {}


def measured_cpu_matmul_tflops(n: int = 1024, repeats: int = 5) -> float:
    """Best fp32 matmul rate of this CPU (TFLOP/s) at n×n×n, the stand-in for a peak on CPU."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e12


# ------------------------------------------------------------------------------------- data

class SyntheticRows(SyntheticSteps):
    """A StepLoader of full rows, a pure function of (seed, step). ``text``: one document of S
    tokens per row; ``packed``: :attr:`DOCUMENTS_PER_ROW` documents of random lengths filling
    each row (document boundaries: the varlen attention path); ``image-text``: one caption sample
    per row, P image positions, SEP, text."""

    IMAGE_BANK = 16
    DOCUMENTS_PER_ROW = 4

    def __init__(self, run: RunConfig, kind: str, num_microbatches: int, dp_rank: int):
        self.kind = kind
        v = run.model.vision
        rows = {"text": ("text",), "packed": ("packed",)}.get(kind, ("full-caption",))
        super().__init__(seed=run.seed, seq=run.model.seq_length, vocab=run.model.vocab_size,
                         micro_batch=run.train.micro_batch_size, num_microbatches=num_microbatches,
                         dp_rank=dp_rank, rows=rows, patches=v.num_patches, width=v.embed_dim,
                         image_bank=self.IMAGE_BANK, embed_dtype=torch.float16)

    def row(self, step: int, r: int):
        if self.kind != "packed":
            return super().row(step, r)
        g = np.random.default_rng([self.seed, step, r, 1])
        n = max(1, min(self.DOCUMENTS_PER_ROW, self.seq // 2))
        cuts = sorted(int(c) for c in g.choice(np.arange(1, self.seq), size=n - 1, replace=False))
        bounds = [0] + cuts + [self.seq]
        return [Sample(self._words(g, b - a), np.ones(b - a, bool)) for a, b in zip(bounds, bounds[1:])]


class TimedLoader:
    """Wraps a StepLoader: when each step's data was asked for, how long the call blocked, and
    what the rows held (positions, loss positions, image positions, document-masked rows)."""

    def __init__(self, inner, num_patches: int):
        self.inner, self.P = inner, num_patches
        self.marks: list[float] = []
        self.waits: list[float] = []
        self.mixes: list[flops.RowMix] = []
        self.packed: list[bool] = []

    def next_step(self) -> list[Batch]:
        t0 = time.perf_counter()
        batches = self.inner.next_step()
        t1 = time.perf_counter()
        self.marks.append(t0)
        self.waits.append(t1 - t0)
        pos = sum(b.tokens.numel() for b in batches)
        loss = sum(int(b.loss_mask.sum().item()) for b in batches)
        img = sum(0 if b.image_slots is None else b.image_slots.shape[0] * self.P for b in batches)
        self.mixes.append(flops.RowMix(pos, loss, img))
        self.packed.append(any(b.cu_seqlens is not None for b in batches))
        return batches

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)

    @property
    def last_stats(self) -> dict:
        return self.inner.last_stats


# ------------------------------------------------------------------------------------ cases

@dataclasses.dataclass
class Case:
    stage: str  # text | packed | image-text
    precision: str  # fp32 | bf16 | fp8-delayed | fp8-current
    data: str  # synthetic | real


@dataclasses.dataclass
class Result:
    case: Case
    backend: str = ""
    steps: int = 0
    step_s_median: float = float("nan")
    tokens_per_s_per_gpu: float = float("nan")
    tokens_per_s_median_step: float = float("nan")
    tflops_per_gpu: float = float("nan")
    data_wait_fraction: float = float("nan")
    image_position_fraction: float = 0.0
    document_masks: bool = False
    last_loss: Optional[float] = None
    skipped: Optional[str] = None


def case_config(base: RunConfig, case: Case, steps: int, run_dir: str) -> RunConfig:
    """The recipe with one stage of this case, long enough that no checkpoint is written."""
    first = base.stages[0]
    per_step = base.train.global_batch_size * base.model.seq_length
    mixture = (dataclasses.replace(first.mixture, text=1.0, captions=0.0, instructions=0.0)
               if case.stage in ("text", "packed") else
               dataclasses.replace(first.mixture, text=0.0, captions=1.0, instructions=0.0))
    stage = dataclasses.replace(
        first, name=case.stage, tokens=(steps + 2) * per_step, epochs=None, mixture=mixture,
        seq_length=None,  # rows of model.seq_length: what the synthetic rows and the FLOP count use
        trainable="all", init=dataclasses.replace(first.init, stage=None, fraction=None, path=None),
        checkpoint_fractions=[1.0], save_every=0)
    logging = dataclasses.replace(base.logging, log_every=10 ** 9)
    # no stop handlers and no time budget: a measurement never writes a stop checkpoint (a SIGTERM
    # reaches the caller, e.g. the selftest, which reports what ran)
    preemption = dataclasses.replace(base.preemption, stop_signals=[], max_wall_minutes=None)
    if case.precision == "fp32":
        precision = dataclasses.replace(base.precision, dtype="fp32", fp8="none")
    elif case.precision == "bf16":
        precision = dataclasses.replace(base.precision, dtype="bf16", fp8="none")
    else:
        precision = dataclasses.replace(base.precision, dtype="bf16", fp8=case.precision.split("-", 1)[1])
    return dataclasses.replace(base, run_dir=run_dir, stages=[stage], logging=logging, precision=precision,
                               preemption=preemption)


def unavailable(case: Case, cuda: bool, te: bool) -> Optional[str]:
    """Why a case cannot run here (None = it can)."""
    if case.precision.startswith("fp8") and not te:
        return "FP8 needs Transformer Engine and a CUDA GPU"
    if case.precision == "bf16" and not cuda:
        return "BF16 training is measured on GPUs only (CPU runs fp32)"
    return None


def run_case(base: RunConfig, case: Case, parallel, steps: int, warmup: int,
             attention: str = "full") -> Result:
    from megavlm.train.loop import StageTrainer
    from megavlm.train.plan import plan_run
    from megavlm.train.stages import default_loader_factory

    res = Result(case)
    # each rank writes (metrics only; no checkpoint is reached) into its own temporary run_dir
    with tempfile.TemporaryDirectory(prefix="megavlm-bench-") as tmp:
        run = case_config(base, case, warmup + steps + 1, tmp)
        st = run.stages[0]
        plan = plan_run(run)[st.name]
        real = default_loader_factory(run) if case.data == "real" else None
        loaders: list[TimedLoader] = []

        def factory(spec, par, nmb):
            inner = real(spec, par, nmb) if real else SyntheticRows(run, case.stage, nmb, par.dp_rank)
            loaders.append(TimedLoader(inner, run.model.vision.num_patches))
            return loaders[-1]

        from megavlm.model.specs import select_backend

        res.backend = select_backend(run.model.backend)
        trainer = StageTrainer(run, plan, parallel, factory, log=lambda s: None)
        out = trainer.train(stop_after=warmup + steps + 1)
        res.last_loss = out.last_loss
        (ld,) = loaders
        step_s = [b - a for a, b in zip(ld.marks, ld.marks[1:])][warmup:]
        waits = ld.waits[warmup:warmup + len(step_s)]
        mixes = ld.mixes[warmup:warmup + len(step_s)]
        del trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    world, dp = parallel.world_size, parallel.dp
    total_s = sum(step_s)
    positions = sum(m.positions for m in mixes) * dp  # loader mixes are per data-parallel rank
    model_flops = sum(flops.training_flops(run.model, m, run.model.seq_length, attention)
                      for m in mixes) * dp
    res.steps = len(step_s)
    res.step_s_median = statistics.median(step_s)
    res.tokens_per_s_per_gpu = positions / total_s / world
    res.tokens_per_s_median_step = positions / len(step_s) / res.step_s_median / world
    res.tflops_per_gpu = model_flops / total_s / world / 1e12
    res.data_wait_fraction = sum(waits) / total_s
    res.image_position_fraction = sum(m.image_positions for m in mixes) / max(1, sum(m.positions for m in mixes))
    res.document_masks = any(ld.packed)
    return res


# ---------------------------------------------------------------------------------- report

def hardware(cuda: bool) -> dict:
    m = machine_info(("megatron-core", "transformer-engine"))
    info = {k: m[k] for k in ("python", "torch", "megatron-core", "transformer-engine")}
    if cuda:
        name = torch.cuda.get_device_name()
        key, peaks = gpu_peak(name)
        info.update(device=name, slug=re.sub(r"[^a-z0-9]+", "-", (key or name).lower()).strip("-"),
                    peak_key=key, peaks=peaks, cuda=torch.version.cuda)
    else:
        rate = measured_cpu_matmul_tflops()
        info.update(device=f"{m['CPU']} ({m['logical CPUs']} logical CPUs, {m['torch threads']} torch threads)",
                    slug="cpu", peak_key="measured fp32 matmul", peaks={"fp32": rate},
                    load=m["load average at start (1/5/15 min)"])
    return info


def _fmt(x: float, spec: str) -> str:
    return "n/a" if x is None or x != x else format(x, spec)


def mfu(res: Result, info: dict, peak_of: str) -> Optional[float]:
    peak = info["peaks"].get(peak_of)
    if peak is None or res.skipped:
        return None
    return res.tflops_per_gpu / peak


def render(results: list[Result], run: RunConfig, info: dict, command: str, world: int,
           steps: int, warmup: int, attention: str = "full") -> str:
    m = run.model
    date = _dt.date.today().isoformat()
    unit = "process" if info["slug"] == "cpu" else "GPU"
    lines = [f"# Training throughput, {info['device']}, {date}", "",
             f"Command: `{command}`", "", "## Machine", ""]
    for k in ("device", "cuda", "load", "python", "torch", "megatron-core", "transformer-engine"):
        if info.get(k):
            lines.append(f"- {'load average (1/5/15 min)' if k == 'load' else k}: {info[k]}")
    if info["slug"] == "cpu":
        lines.append(f"- MFU reference: measured fp32 matmul rate of this CPU, "
                     f"{info['peaks']['fp32'] * 1e3:.1f} GFLOP/s (1024³, best of 5) — not a datasheet peak")
    else:
        pk = info["peaks"]
        lines.append(f"- MFU reference: dense peak of {info['peak_key'] or 'unknown GPU (no MFU)'}: "
                     + ", ".join(f"{k} {v} TFLOP/s" for k, v in pk.items() if v))
    lines += ["", "## Model and setup", "",
              f"- layers {m.num_layers}, d {m.hidden_size}, heads {m.num_attention_heads}, SwiGLU "
              f"{m.ffn_hidden_size}, vocab {m.vocab_size}, seq {m.seq_length}; images: "
              f"{m.vision.num_patches} × {m.vision.embed_dim}, projector ×{m.vision.projector_mult}",
              f"- processes {world} (tp {run.parallel.tp}, pp {run.parallel.pp}, dp "
              f"{world // (run.parallel.tp * run.parallel.pp)}), micro-batch {run.train.micro_batch_size}, "
              f"global batch {run.train.global_batch_size}, recompute {run.parallel.recompute}, "
              f"sequence parallel {run.parallel.sequence_parallel}",
              f"- {steps} measured steps after {warmup} warm-up steps per case",
              f"- FLOPs: megavlm.model.flops, attention counted over the {attention} row "
              f"(text: {flops.text_flops_per_token(m, attention=attention) / 1e9:.4g} GFLOP/token; "
              f"caption rows: {flops.caption_flops_per_token(m, attention=attention) / 1e9:.4g} GFLOP/position)"
              if m.vision.num_patches + 2 <= m.seq_length else
              f"- FLOPs: megavlm.model.flops, attention counted over the {attention} row",
              "", "## Results", "",
              f"| stage | precision | data | layer spec | step s (median) | tokens/s/{unit} | (at median step) | "
              f"TFLOP/s/{unit} | MFU | "
              "MFU vs FP8 peak | data waiting | image positions | doc masks | loss |",
              "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    main_peak = "fp32" if info["slug"] == "cpu" else "bf16"
    for r in results:
        c = r.case
        if r.skipped:
            lines.append(f"| {c.stage} | {c.precision} | {c.data} | | not run: {r.skipped} | | | | | | | | | |")
            continue
        fp8_mfu = mfu(r, info, "fp8") if c.precision.startswith("fp8") else None
        lines.append(
            f"| {c.stage} | {c.precision} | {c.data} | {r.backend} | {r.step_s_median:.4f} | "
            f"{r.tokens_per_s_per_gpu:,.0f} | {r.tokens_per_s_median_step:,.0f} | {r.tflops_per_gpu:.4g} | "
            f"{_fmt(mfu(r, info, main_peak), '.1%')} | {_fmt(fp8_mfu, '.1%')} | "
            f"{r.data_wait_fraction:.2%} | {r.image_position_fraction:.1%} | "
            f"{'yes' if r.document_masks else 'no'} | {_fmt(r.last_loss, '.3f')} |")
    ratios = _ratios(results)
    if ratios:
        lines += ["", "## Ratios (same run)", ""] + [f"- {k}: {v:.3f}" for k, v in ratios.items()]
    lines += ["", "Step time = interval between consecutive data requests (data + forward/backward + "
              "optimizer + loss reduction, which synchronises the device). tokens/s and TFLOP/s use the "
              "total time of the measured steps; '(at median step)' uses the median step, which a loaded "
              "machine disturbs less. Data waiting = time inside loader.next_step() / step time. Tokens are "
              "sequence positions, image positions included."]
    return "\n".join(lines) + "\n"


def _ratios(results: list[Result]) -> dict[str, float]:
    got = {(r.case.stage, r.case.precision, r.case.data): r.tokens_per_s_per_gpu
           for r in results if not r.skipped}
    out = {}
    for (stage, prec, data), v in got.items():
        if prec.startswith("fp8") and (stage, "bf16", data) in got:
            out[f"{prec} / bf16 tokens/s ({stage}, {data})"] = v / got[(stage, "bf16", data)]
        if stage == "image-text" and ("text", prec, data) in got:
            out[f"image-text / text tokens/s ({prec}, {data})"] = v / got[("text", prec, data)]
    return out


# ------------------------------------------------------------------------------------ main

def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="megavlm bench throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="recipe (default: tiny)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.micro_batch_size=4")
    p.add_argument("--stages", default="text,image-text",
                   help="comma list of text, packed (several documents per row), image-text")
    p.add_argument("--precisions", default="auto",
                   help="comma list of fp32, bf16, fp8-delayed, fp8-current; auto = bf16,fp8-delayed,"
                        "fp8-current on a GPU, fp32 on CPU")
    p.add_argument("--data", default="synthetic", help="comma list of synthetic, real")
    p.add_argument("--steps", type=int, default=10, help="measured steps per case")
    p.add_argument("--warmup", type=int, default=3, help="warm-up steps per case (not measured)")
    p.add_argument("--attention", choices=["full", "causal"], default="full",
                   help="attention FLOP convention (see megavlm.model.flops)")
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks"))
    p.add_argument("--no-write", action="store_true", help="print the markdown only")
    args = p.parse_intermixed_args(argv)

    from megavlm.model.specs import te_usable
    from megavlm.parallel.state import Parallel

    base = load_config(args.config, args.overrides)
    cuda, te = torch.cuda.is_available(), te_usable()
    precisions = (["bf16", "fp8-delayed", "fp8-current"] if cuda else ["fp32"]) \
        if args.precisions == "auto" else args.precisions.split(",")
    for x in precisions:
        if x not in ("fp32", "bf16", "fp8-delayed", "fp8-current"):
            p.error(f"unknown precision {x}")
    stages = args.stages.split(",")
    for x in stages:
        if x not in ("text", "packed", "image-text"):
            p.error(f"unknown stage {x}")
    datas = args.data.split(",")
    for x in datas:
        if x not in ("synthetic", "real"):
            p.error(f"unknown data {x}")
    info = hardware(cuda)  # before the runs: the load average is the machine's, not ours
    parallel = Parallel.initialize(base.parallel, base.seed)
    results = []
    try:
        for data in datas:
            for stage in stages:
                for prec in precisions:
                    case = Case(stage, prec, data)
                    why = unavailable(case, cuda, te)
                    if why:
                        results.append(Result(case, skipped=why))
                        continue
                    r = run_case(base, case, parallel, args.steps, args.warmup, args.attention)
                    results.append(r)
                    if parallel.rank == 0:
                        print(f"{stage:10s} {prec:12s} {data:9s} {r.tokens_per_s_per_gpu:12,.0f} tok/s/GPU "
                              f"{r.tflops_per_gpu:9.4g} TFLOP/s  data wait {r.data_wait_fraction:.2%}",
                              flush=True)
        world = parallel.world_size
    finally:
        parallel.destroy()
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if info["slug"] == "cpu":  # a shared CPU's numbers mean little without its load
        info["load"] += " at start, " + load_average() + " at end"
    command = "megavlm bench throughput " + " ".join(shlex.quote(a) for a in argv)
    md = render(results, base, info, command, world, args.steps, args.warmup, args.attention)
    if args.no_write:
        print(md)
        return 0
    out = write_report(args.out_dir, info["slug"], "throughput", md)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
