"""Training throughput on CPU: megavlm's engine vs the same model and loop in plain PyTorch.

Why: megavlm trains through megatron-core (DDP grad buffers, DistributedOptimizer, the pipeline
schedule's forward-backward, CPU shims). This measures what that machinery costs at the demo size
against the floor — the identical model written in plain PyTorch (megavlm.model.reference) with
torch AdamW and the same loss — in the same process, on the same batches, from the same weights.

Both sides run the tiny recipe's model and batch settings (fp32, one process): micro-batches of
``train.micro_batch_size`` rows accumulated to ``train.global_batch_size``, the masked loss sum
(with z-loss) divided once by the step's loss-token count, AdamW with the recipe's betas, weight
decay (not on 1-D tensors) and gradient clipping, the stage's LR schedule. Batches are synthetic
text rows (half of them two packed documents), generated inside each step on both sides. The
plain model carries the projector too; when the stage trains it (not ``trainable: lm``) it steps
it with zero gradients, as megatron's optimizer does for an untouched parameter, so both sides
do the same optimizer work.

A step's time runs from one step's data request to the next (data, forward-backward, optimizer,
logging): the interval between consecutive ``next_step`` calls of the loader. Warm-up steps are
dropped. The two systems alternate in ABBA order over ``--rounds`` rounds so drifting machine
load hits both alike. The result is written as dated markdown under benchmarks/.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from torch import Tensor, nn

from megavlm.bench.artifact import load_average, machine_info, write_report
from megavlm.bench.synthetic import SyntheticSteps
from megavlm.config import RunConfig, load_config
from megavlm.run_folder import METRICS
from megavlm.data.batch import Batch, Sample, collate
from megavlm.model.reference import ReferenceDCLM, document_bounds, document_mask, to_openlm_names
from megavlm.ops.masked_ce import masked_cross_entropy_reference
from megavlm.config import num_microbatches

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "launch" / "configs" / "tiny.yaml"


# ------------------------------------------------------------------------------------ data

class SyntheticTextLoader(SyntheticSteps):
    """A StepLoader of random text rows (even rows: two packed documents; odd rows: one), a pure
    function of (seed, step). It records when each step's data is requested: the step clock."""

    def __init__(self, *, seed: int, vocab: int, seq: int, micro_batch: int, num_microbatches: int):
        super().__init__(seed=seed, seq=seq, vocab=vocab, micro_batch=micro_batch,
                         num_microbatches=num_microbatches, rows=("packed", "text"))
        self.marks: list[tuple[float, float]] = []  # (wall clock, this process's CPU time)

    def next_step(self) -> list[Batch]:
        self.marks.append((time.perf_counter(), time.process_time()))
        return super().next_step()

    def step_seconds(self) -> list[tuple[float, float]]:
        """(wall, CPU) seconds of every step that was followed by another data request."""
        return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(self.marks, self.marks[1:])]


# ------------------------------------------------------------------------------- configuration

def bench_config(config: Path, overrides: Sequence[str], total_steps: int, run_dir: str) -> RunConfig:
    """The recipe's model and batch settings with one text stage of ``total_steps + 1`` steps
    (the run stops one step early, so no checkpoint is ever written), fp32, one process."""
    run = load_config(config, list(overrides))
    first = run.stages[0]
    per_step = run.train.global_batch_size * run.model.seq_length
    stage = dataclasses.replace(
        first, name="bench", tokens=(total_steps + 1) * per_step, epochs=None, seq_length=None,
        mixture=dataclasses.replace(first.mixture, text=1.0, captions=0.0, instructions=0.0),
        init=dataclasses.replace(first.init, stage=None, fraction=None, path=None),
        checkpoint_fractions=[1.0], save_every=0)
    return dataclasses.replace(
        run, run_dir=run_dir, stages=[stage],
        parallel=dataclasses.replace(run.parallel, tp=1, pp=1, vpp=None, sequence_parallel=False),
        precision=dataclasses.replace(run.precision, dtype="fp32"))


def _stage_plan(run: RunConfig):
    from megavlm.train.plan import plan_run

    return plan_run(run)[run.stages[0].name]


def _loader(run: RunConfig, nmb: int) -> SyntheticTextLoader:
    return SyntheticTextLoader(seed=run.seed, vocab=run.model.vocab_size, seq=run.model.seq_length,
                               micro_batch=run.train.micro_batch_size, num_microbatches=nmb)


def initial_weights(run: RunConfig, parallel) -> dict[str, Tensor]:
    """Full tensors of the model megavlm initialises for ``run`` (both systems start from them)."""
    from megavlm.model.export import full_tensors
    from megavlm.model.build import build_model

    chunks, _ = build_model(run, parallel, torch.float32)
    return full_tensors(chunks)


# ---------------------------------------------------------------------------------- megavlm

def run_megavlm(run: RunConfig, parallel, total_steps: int) -> tuple[list[tuple[float, float]], list[float]]:
    """(step seconds, losses) of ``total_steps`` steps through megavlm's StageTrainer."""
    from megavlm.train.loop import StageTrainer

    loaders: list[SyntheticTextLoader] = []

    def factory(spec, par, nmb):
        loaders.append(_loader(run, nmb))
        return loaders[-1]

    Path(run.run_dir).mkdir(parents=True, exist_ok=True)
    trainer = StageTrainer(run, _stage_plan(run), parallel, factory, log=lambda s: None)
    trainer.train(stop_after=total_steps)
    metrics = [json.loads(line) for line in (Path(run.run_dir) / METRICS).read_text().splitlines()]
    return loaders[0].step_seconds(), [m["loss"] for m in metrics]


# ---------------------------------------------------------------------------- plain PyTorch

class PlainVLM(nn.Module):
    """The reference language model plus the projector MLP, as plain torch modules."""

    def __init__(self, run: RunConfig):
        super().__init__()
        v = run.model.vision
        self.lm = ReferenceDCLM(run.model)
        self.projector = nn.Sequential(nn.Linear(v.embed_dim, v.projector_mult * v.embed_dim),
                                       nn.GELU(), nn.Linear(v.projector_mult * v.embed_dim,
                                                            run.model.hidden_size))

    def load_megavlm(self, full: dict[str, Tensor]) -> None:
        self.lm.load_state_dict(to_openlm_names(full, self.lm.cfg), strict=True)
        with torch.no_grad():
            for i, name in ((0, "fc1"), (2, "fc2")):
                self.projector[i].weight.copy_(full[f"projector.{name}.weight"])
                self.projector[i].bias.copy_(full[f"projector.{name}.bias"])


def run_plain(run: RunConfig, full: dict[str, Tensor],
              total_steps: int) -> tuple[list[tuple[float, float]], list[float]]:
    """(step seconds, losses) of ``total_steps`` steps of the same model and loop in plain PyTorch."""
    t = run.train
    stage = run.stages[0]
    model = PlainVLM(run)
    model.load_megavlm(full)
    model.train()
    if stage.trainable == "lm":  # the stage freezes the projector on the megavlm side too
        model.projector.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    plan = _stage_plan(run)
    o = plan.optimizer
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=0.0, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps)
    for p in params:  # untouched parameters step with zero gradients (as in megatron)
        p.grad = torch.zeros_like(p)
    sched = plan.schedule
    loader = _loader(run, num_microbatches(run.train))
    z = run.model.z_loss
    losses = []
    for step in range(total_steps):
        batches = loader.next_step()
        lr = sched.lr(step)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=False)
        count = sum(b.loss_mask.sum() for b in batches)
        total = torch.zeros(())
        for b in batches:
            mask = document_mask(document_bounds(b.position_ids), *b.position_ids.shape) if b.cu_seqlens is not None else None
            hidden = model.lm.hidden(b.tokens, b.position_ids, mask)
            loss_sum, _ = masked_cross_entropy_reference(
                hidden.reshape(-1, hidden.shape[-1]), model.lm.output.weight, b.labels.reshape(-1),
                b.loss_mask.reshape(-1), z_loss=z)
            (loss_sum / count).backward()
            total += loss_sum.detach()
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        losses.append((total / count).item())
    return loader.step_seconds(), losses


# ---------------------------------------------------------------------------------- reporting

@dataclasses.dataclass
class Measured:
    system: str
    seconds: list[float]  # wall seconds of the timed steps, warm-up dropped, all rounds pooled
    cpu: list[float]  # CPU seconds of this process over the same steps
    rounds: list[float]  # median wall step seconds per round
    losses: list[float]  # losses of the first round (all steps)

    def median(self) -> float:
        return statistics.median(self.seconds)

    def cpu_median(self) -> float:
        return statistics.median(self.cpu)


def render(run: RunConfig, results: dict[str, Measured], info: dict[str, str], command: str,
           args) -> str:
    m, t = run.model, run.train
    o = _stage_plan(run).optimizer
    tokens = t.global_batch_size * m.seq_length
    mega, plain = results["megavlm"], results["plain"]
    ratio = plain.median() / mega.median()
    lines = [f"# Training throughput, CPU, {_dt.date.today().isoformat()}", "",
             f"Command: `{command}`", "", "## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines += ["", "## Case", "",
              f"- model: {m.num_layers} layers, d {m.hidden_size}, {m.num_attention_heads} heads, "
              f"SwiGLU {m.ffn_hidden_size}, vocab {m.vocab_size}, seq {m.seq_length}, qk-norm, "
              f"z-loss {m.z_loss:g}; projector {m.vision.embed_dim}→{m.vision.projector_mult * m.vision.embed_dim}"
              f"→{m.hidden_size} (stepped, unused by text rows)",
              f"- batch: micro {t.micro_batch_size} x {num_microbatches(run.train)} microbatches = global "
              f"{t.global_batch_size} rows = {tokens} tokens per step; synthetic text, half the rows "
              "two packed documents",
              f"- fp32, one process; AdamW (β {o.adam_beta1}/{o.adam_beta2}, wd {o.weight_decay}), "
              f"grad clip {o.grad_clip}, LR schedule of the recipe's first stage",
              f"- {args.steps} timed steps after {args.warmup} warm-up steps per run, {args.rounds} rounds "
              "in ABBA order (megavlm, plain, plain, megavlm, ...); a step = data request to the "
              "next data request",
              "- megavlm: StageTrainer (megatron DDP + DistributedOptimizer + "
              "get_forward_backward_func); plain: megavlm.model.reference.ReferenceDCLM + torch AdamW, "
              "the same masked loss sum / count, same initial weights",
              "- CPU ms: this process's CPU time per step (all its threads), less sensitive than "
              "wall time to other processes sharing the cores",
              "", "## Results", "",
              "| system | tokens/s (median step) | median ms | min ms | max ms | per-round median ms "
              "| CPU ms (median) | loss step 1 | loss last step |",
              "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    for r in (mega, plain):
        lines.append(f"| {r.system} | {tokens / r.median():.0f} | {1e3 * r.median():.1f} | "
                     f"{1e3 * min(r.seconds):.1f} | {1e3 * max(r.seconds):.1f} | "
                     + ", ".join(f"{1e3 * x:.1f}" for x in r.rounds)
                     + f" | {1e3 * r.cpu_median():.1f} | {r.losses[0]:.5f} | {r.losses[-1]:.5f} |")
    cpu_ratio = plain.cpu_median() / mega.cpu_median()
    lines += ["", f"**megavlm / plain PyTorch throughput: {ratio:.3f}x** (target ≥ 0.8x); "
              f"by CPU time per step: {cpu_ratio:.3f}x", "",
              "Load average at the end (1/5/15 min): " + load_average(), ""]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------- main

def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="megavlm bench train", description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="recipe (default: tiny.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override (repeatable)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each run")
    p.add_argument("--rounds", type=int, default=4, help="runs per system, in ABBA order")
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks"))
    p.add_argument("--no-write", action="store_true", help="print the markdown only")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        p.error("--steps and --rounds must be >= 1, --warmup >= 0")
    command = "megavlm bench train " + " ".join(
        shlex.quote(a) for a in (sys.argv[2:] if argv is None else argv))

    import torch.distributed as dist

    from megavlm.parallel.state import Parallel

    info = machine_info()  # before the runs: the load average is the machine's, not ours
    total = args.warmup + args.steps + 1  # +1: the last step only closes the previous interval
    owns_world = not dist.is_initialized()
    with tempfile.TemporaryDirectory(prefix="megavlm-bench-") as tmp:
        base = bench_config(args.config, args.overrides, total, str(Path(tmp) / "run"))
        parallel = Parallel.initialize(base.parallel, base.seed)
        try:
            full = initial_weights(base, parallel)  # the plain model starts from megavlm's weights
            results = {s: Measured(s, [], [], [], []) for s in ("megavlm", "plain")}
            for r in range(args.rounds):
                order = ("megavlm", "plain") if r % 2 == 0 else ("plain", "megavlm")
                for system in order:
                    if system == "megavlm":
                        run = dataclasses.replace(base, run_dir=str(Path(tmp) / f"run{r}"))
                        secs, losses = run_megavlm(run, parallel, total)
                    else:
                        secs, losses = run_plain(base, full, total)
                    timed = secs[args.warmup:]
                    res = results[system]
                    res.seconds += [w for w, _ in timed]
                    res.cpu += [c for _, c in timed]
                    res.rounds.append(statistics.median(w for w, _ in timed))
                    if not res.losses:
                        res.losses = losses
        finally:
            if owns_world:
                parallel.destroy()
    text = render(base, results, info, command, args)
    print(text)
    tokens = base.train.global_batch_size * base.model.seq_length
    mega, plain = results["megavlm"], results["plain"]
    print(f"megavlm {tokens / mega.median():.0f} tokens/s, plain PyTorch {tokens / plain.median():.0f} "
          f"tokens/s, ratio {plain.median() / mega.median():.3f}")
    if not args.no_write:
        print(f"wrote {write_report(args.out_dir, 'cpu', 'train', text)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
