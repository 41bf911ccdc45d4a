"""Training one stage on megatron-core: build, resume, step, log, checkpoint.

Per stage: the model chunks (one per virtual pipeline stage) are built and initialised
layout-independently, wrapped in megatron DDP, and given a DistributedOptimizer (AdamW). The
stage then resumes from its own newest complete checkpoint (model, optimizer, step, data
position) or, on a first start, loads the weights of the checkpoint it names
(``init: {stage, fraction}``) with a fresh optimizer. Each step sets the LR from the pure
schedule, runs megatron's forward-backward over the microbatches, steps the optimizer, appends
one line to ``metrics.jsonl`` (and the TensorBoard / W&B sinks, megavlm.sinks) and
checkpoints at the stage's fractions (and every N steps).

Long runs: the step's loss reduction also agrees on a stop request across ranks (a signal or the
time budget, megavlm.train.preemption: save at that step, exit 75), and the guard
(megavlm.train.guard) skips or stops on a non-finite loss / gradient norm or a loss spike.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megavlm.config import ConfigError, RunConfig, num_microbatches
from megavlm.data.mixture import LoaderSpec
from megavlm.model.build import build_model, model_dtype
from megavlm.parallel.state import Parallel
from megavlm import run_folder
from megavlm.train import checkpoint as ckpt
from megavlm.train.guard import LossGuard, NonFiniteGradNorm, guard_grad_norm
from megavlm.train.preemption import REASONS, Preempted, StopRequests, report_exit_code, EXIT_PREEMPTED
from megavlm.sinks import Sinks, check_available
from megavlm.train.loader import StepLoader
from megavlm.train.plan import StagePlan
from megavlm.train.schedule import recorded
from megavlm.train.step import StepLayout, make_forward_step


LoaderFactory = Callable[[LoaderSpec, Parallel, int], StepLoader]
"""(the stage's loader spec, this rank's layout, microbatches per step) -> this rank's loader."""


def set_trainable(chunks, trainable: str) -> None:
    """Freeze what the stage does not train (frozen parameters get no grad buffer and no
    optimizer state, and weight decay never touches them). ``trainable`` is one of
    megavlm.config.TRAINABLE."""
    from megavlm.config import TRAINABLE

    if trainable not in TRAINABLE:
        raise ValueError(f"trainable {trainable!r} is not one of {list(TRAINABLE)}")
    for c in chunks:
        for name, p in c.named_parameters():
            is_projector = name.startswith("projector.")
            p.requires_grad_({"projector": is_projector, "lm": not is_projector, "all": True}[trainable])


def wrap_ddp(chunks, tc):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                            use_distributed_optimizer=True,
                                            # the guard decides on NaN/Inf (megavlm.train.guard)
                                            check_for_nan_in_grad=False)
    return [DistributedDataParallel(config=tc, ddp_config=ddp_cfg, module=c, disable_bucketing=i > 0)
            for i, c in enumerate(chunks)]


def build_optimizer(plan: StagePlan, model, dtype: torch.dtype):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    o = plan.optimizer
    cfg = OptimizerConfig(
        optimizer="adam", lr=0.0, min_lr=0.0, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
        clip_grad=o.grad_clip, bf16=dtype == torch.bfloat16,
        params_dtype=dtype, use_distributed_optimizer=True)
    # megatron asks for gloo copies of the DP groups unless told otherwise; they exist only when
    # we run over gloo (Parallel.initialize creates them for that backend alone). Under NCCL the
    # default asserted "Intra partial data parallel group is not initialized" on the first H200 run.
    gloo = dist.get_backend() == "gloo"
    return get_megatron_optimizer(cfg, model, use_gloo_process_groups=gloo)


@dataclass
class StageOutcome:
    name: str
    steps: int
    last_loss: Optional[float]
    skipped: bool = False


class MetricsLog:
    """``<run_dir>/metrics.jsonl``: one JSON object per step (written by the logging rank)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def truncate_after(self, stage: str, step: int) -> None:
        """On resume, drop lines of this stage past the checkpoint so steps are never duplicated."""
        if not self.enabled or not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            rec = json.loads(line)
            if rec["stage"] == stage and rec["step"] > step:
                continue
            keep.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(k + "\n" for k in keep))
        tmp.replace(self.path)

    def write(self, rec: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(rec) + "\n")


_MIX_KEYS = ("image_sample_positions", "patch_positions", "pad_positions")


def _reduce_losses(losses: list[dict], parallel: Parallel, mix: dict,
                   stop: int = 0) -> tuple[float, int, dict, int]:
    """Global (mean loss, loss-token count, mixture position counts, agreed stop request) of one
    step: losses come from the last pipeline stage's microbatch reports, mixture counts from each
    DP rank's loader, the stop request (megavlm.train.preemption) is the MAX over all ranks.

    Every collective's tensor lives on ``parallel.device`` (NCCL takes no host tensors); float64
    keeps the token and position counts exact far past 2**24. The one host copy is at the end."""
    from megatron.core import parallel_state as ps

    dev = parallel.device
    total = torch.zeros(2 + len(_MIX_KEYS), dtype=torch.float64, device=dev)
    for rec in losses:
        total[:2] += rec["loss"].to(device=dev, dtype=torch.float64)
    total[2:] = torch.tensor([float(mix.get(k, 0)) for k in _MIX_KEYS], dtype=torch.float64, device=dev)
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        dist.all_reduce(total, group=parallel.dp_group)
    # share with the other pipeline stages so every rank can log / stop consistently
    src = ps.get_pipeline_model_parallel_last_rank()
    dist.broadcast(total, src=src, group=parallel.pp_group)
    flag = torch.tensor([float(stop)], dtype=torch.float64, device=dev)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # a signal may have reached only some ranks
    loss_sum, count, *counts, agreed = torch.cat([total, flag]).tolist()  # the one host copy
    return (loss_sum / max(count, 1.0), int(count), {k: int(v) for k, v in zip(_MIX_KEYS, counts)},
            int(agreed))


class StageTrainer:
    """Runs one stage to its end (or to ``stop_after`` steps: benchmarks, tests of early stops)."""

    def __init__(self, run: RunConfig, plan: StagePlan, parallel: Parallel,
                 loader_factory: LoaderFactory, log: Callable[[str], None] = print):
        self.run, self.plan, self.parallel = run, plan, parallel
        self.stage, self.sched = plan.config, plan.schedule
        self.loader_factory, self.log = loader_factory, log
        self.run_dir = Path(run.run_dir)
        self.metrics = MetricsLog(self.run_dir / run_folder.METRICS, parallel.is_logging_rank)
        check_available(run)  # an asked-for sink that is not installed fails before any training

    def train(self, stop_after: Optional[int] = None,
              observer: Optional[Callable[[str, int, list], None]] = None) -> StageOutcome:
        """Train to the end of the stage.

        ``stop_after`` ends early after that many steps. ``observer(stage, step, model)`` is
        called when the step's gradients are final, before the optimizer uses them (the demo's
        progress bars advance there; parity tests read the gradients there).

        Raises :class:`~megavlm.train.preemption.Preempted` (exit 75) after saving the stop
        checkpoint and :class:`~megavlm.train.guard.TrainingDiverged` (exit 1) on a guard stop."""
        with StopRequests(self.run.preemption.stop_signals, self.run.preemption.max_wall_minutes) as stops, \
                Sinks(self.run, self.parallel.is_logging_rank) as sinks:
            return self._train(stop_after, observer, stops, sinks)

    def _train(self, stop_after, observer, stops: StopRequests, sinks: Sinks) -> StageOutcome:
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.pipeline_parallel import get_forward_backward_func

        run, stage, par = self.run, self.stage, self.parallel
        T = self.sched.steps
        fractions: dict[int, list[float]] = {}  # a short stage can hit several fractions at one step
        for f, k in self.plan.checkpoints:
            fractions.setdefault(k, []).append(f)
        done = ckpt.latest(run.run_dir, stage.name)
        done_meta = json.loads((done.path / ckpt.META).read_text()) if done is not None else {}
        saved_batch = done_meta.get("global_batch_size")  # absent in checkpoints older than the field
        if saved_batch is not None and saved_batch != self.plan.global_batch_size:
            raise ConfigError(f"[{stage.name}] {done.path} was trained at global batch {saved_batch}; this "
                              f"run's stage batch is {self.plan.global_batch_size} (stages.{stage.name}."
                              "global_batch_size / train.global_batch_size): resuming or skipping it would "
                              "change the data order and the step count; restore the batch or use another run_dir")
        if done is not None and done.step >= T:
            self.log(f"[{stage.name}] complete ({T} steps), skipping")
            return StageOutcome(stage.name, T, None, skipped=True)
        ckpt.clean_partial(run.run_dir, stage.name)

        dtype = model_dtype(run)
        chunks, tc = build_model(run, par, dtype)
        set_trainable(chunks, stage.trainable)
        model = wrap_ddp(chunks, tc)
        optimizer = build_optimizer(self.plan, model, dtype)
        tc.finalize_model_grads_func = finalize_model_grads
        tc.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
        tc.grad_sync_func = None

        nmb = num_microbatches(run.train, par.dp, self.plan.global_batch_size,
                               where=(f"stages.{stage.name}.global_batch_size" if stage.global_batch_size
                                      is not None else "train.global_batch_size"))
        loader: StepLoader = self.loader_factory(self.plan.loader, par, nmb)
        start = 0
        guard_window = None
        if done is not None:
            guard_window = done_meta.get("guard_window")
            ckpt.load(done.path, model, optimizer)
            loader.load_state_dict(ckpt.read_loader_state(done.path, par.dp_rank))
            start = done.step
            self.metrics.truncate_after(stage.name, start)
            self.log(f"[{stage.name}] resumed from {done.path} at step {start}/{T}")
        elif stage.init.stage is not None or stage.init.path is not None:
            src = (Path(stage.init.path) if stage.init.path else
                   ckpt.at_fraction(run.run_dir, stage.init.stage, stage.init.fraction).path)
            ckpt.load(src, model, None)
            if hasattr(optimizer, "reload_model_params"):
                optimizer.reload_model_params()
            self.log(f"[{stage.name}] starting from {src}")

        fwd_bwd = get_forward_backward_func()
        S = self.plan.seq_length
        layout = StepLayout(S, run.train.micro_batch_size, pipelined=par.pp > 1)
        forward_step = make_forward_step(z_loss=run.model.z_loss, tp_group=par.tp_group,
                                         device=par.device, layout=layout)
        p2p_seq, p2p_mb = layout.p2p_shape  # packed rows travel flattened: [B·S, 1, d]
        step_tokens = self.plan.tokens_per_step
        last_loss = None
        end = T if stop_after is None else min(T, start + stop_after)
        wd = self.plan.optimizer.weight_decay
        guard = LossGuard(run.guard, stage.name, guard_window)
        guard_grad_norm(optimizer)
        for step in range(start, end):
            t0 = time.perf_counter()
            lr = self.sched.lr(step)
            for g in optimizer.param_groups:  # megatron's groups carry lr/wd multipliers
                g["lr"] = lr * g.get("lr_mult", 1.0)
                g["weight_decay"] = wd * g.get("wd_mult", 1.0)
            batches = loader.next_step()
            iters = [iter(batches) for _ in model]
            optimizer.zero_grad()
            for m in model:
                m.zero_grad_buffer()
            losses = fwd_bwd(forward_step_func=forward_step,
                             data_iterator=iters if len(iters) > 1 else iters[0], model=model,
                             num_microbatches=nmb, seq_length=p2p_seq, micro_batch_size=p2p_mb,
                             forward_only=False)
            if observer is not None:
                observer(stage.name, step + 1, model)
            k = step + 1
            loss, n_loss, mix, stop = _reduce_losses(losses, par, loader.last_stats,
                                                     stops.local())
            skip, warn = guard.judge_loss(k, loss)  # raises TrainingDiverged on a stop: nothing saved
            grad_norm = None
            if skip is None:
                try:
                    ok, grad_norm, _ = optimizer.step()
                    skip = None if ok else "optimizer skipped the update (found inf)"
                except NonFiniteGradNorm as e:  # raised before clipping / updating
                    skip = guard.nonfinite(k, "grad_norm", e.value)
            if skip is None:
                guard.accepted(loss)
            dt = time.perf_counter() - t0
            last_loss = loss
            rec = {"stage": stage.name, "step": step + 1, "loss": loss, "lr": lr,
                   "tokens": step_tokens, "loss_tokens": n_loss,
                   "grad_norm": None if grad_norm is None else float(grad_norm),
                   "tokens_per_s": step_tokens / dt,
                   # the stage's image-text ratio (positions of image samples) and pure patch share
                   "image_text_ratio": mix["image_sample_positions"] / step_tokens,
                   "patch_fraction": mix["patch_positions"] / step_tokens,
                   "padding_fraction": mix["pad_positions"] / step_tokens}
            if skip is not None:
                rec.update(skipped=True, skip_reason=skip)
            self.metrics.write(rec)
            sinks.step(rec, k)
            for note in (warn, skip and f"[{stage.name}] step {k}: skipped the update: {skip}"):
                if note:
                    self.log(note)
            if par.is_logging_rank and ((step + 1) % run.logging.log_every == 0 or step + 1 == T):
                self.log(f"[{stage.name}] step {step + 1}/{T} loss {loss:.4f} lr {lr:.3e} "
                         f"grad {rec['grad_norm'] or 0:.3f} tok/s {rec['tokens_per_s']:.0f}")
            periodic = stage.save_every and k % stage.save_every == 0
            if k in fractions or periodic or k == T or stop:
                meta = {"stage": stage.name, "step": k, "steps": T, "fractions": fractions.get(k, []),
                        "tokens": k * step_tokens, "global_batch_size": self.plan.global_batch_size,
                        "seed": run.seed, "schedule": recorded(self.sched),
                        "guard_window": guard.state()}
                path = ckpt.stage_dir(run.run_dir, stage.name) / run_folder.step_dir_name(k)
                ckpt.save(path, model, optimizer, meta, loader.state_dict(), par.dp_rank,
                          write_loader=par.tp_rank == 0 and par.pp_rank == 0,
                          run_config=run, tokenizer=run.data.resolve(run.data.tokenizer))
                ckpt.prune(run.run_dir, stage.name, set(fractions))
            if stop:
                stopped = Preempted(stage.name, k, REASONS[stop])
                self.log(str(stopped))
                report_exit_code(EXIT_PREEMPTED, par.rank)
                raise stopped
        return StageOutcome(stage.name, end, last_loss)
