"""Training one stage on megatron-core: build, resume, step, log, checkpoint.

Per stage: the model chunks (one per virtual pipeline stage) are built and initialised
layout-independently, wrapped in megatron DDP, and given a DistributedOptimizer (AdamW). The
stage then resumes from its own newest complete checkpoint (model, optimizer, step, data
position) or, on a first start, loads the weights of the checkpoint it names
(``init: {stage, fraction}``) with a fresh optimizer. Each step sets the LR from the pure
schedule, runs megatron's forward-backward over the microbatches, steps the optimizer, appends
one line to ``metrics.jsonl`` and checkpoints at the stage's fractions (and every N steps).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Protocol

import torch
import torch.distributed as dist

from megavlm.config import RunConfig, StageConfig
from megavlm.data.batch import Batch
from megavlm.parallel.state import Parallel
from megavlm.train import checkpoint as ckpt
from megavlm.train.schedule import StageSchedule, checkpoint_steps
from megavlm.train.step import StepLayout, make_forward_step


class StepLoader(Protocol):
    """What the loop needs from a data loader (megavlm.data.mixture.StageLoader is the real one)."""

    def next_step(self) -> list[Batch]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


LoaderFactory = Callable[[StageConfig, Parallel, int], StepLoader]


def model_dtype(run: RunConfig) -> torch.dtype:
    p = run.train.precision
    if p == "fp32":
        return torch.float32
    bf16_ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if p == "bf16":
        if not bf16_ok and torch.cuda.is_available():
            raise RuntimeError("train.precision=bf16 but this GPU has no bf16 support")
        return torch.bfloat16
    return torch.bfloat16 if bf16_ok else torch.float32


def build_model(run: RunConfig, parallel: Parallel, dtype: torch.dtype, backend: Optional[str] = None):
    """The model chunks of this rank (unwrapped), initialised from the run seed. ``backend``
    overrides ``run.model.backend`` (auto = TE when TE and a GPU are usable, else local)."""
    from megavlm.model.init import initialize
    from megavlm.model.specs import select_backend, transformer_config
    from megavlm.model.vlm import build_chunks

    backend = select_backend(backend or run.model.backend)
    t = run.train
    tc = transformer_config(run.model, run.parallel, dtype=dtype, batch_p2p_comm=parallel.p2p_batched,
                            backend=backend, fp8=t.fp8, fp8_format=t.fp8_format,
                            fp8_amax_history_len=t.fp8_amax_history_len)
    chunks = build_chunks(tc, run.model, parallel.vpp, backend=backend)
    initialize(chunks, run.model, run.seed, parallel.tp_rank, parallel.tp)
    for c in chunks:
        c.to(parallel.device)
    return chunks, tc


def set_trainable(chunks, trainable: str) -> None:
    """Freeze what the stage does not train (frozen parameters get no grad buffer and no
    optimizer state, and weight decay never touches them)."""
    for c in chunks:
        for name, p in c.named_parameters():
            is_projector = name.startswith("projector.")
            p.requires_grad_({"projector": is_projector, "lm": not is_projector}.get(trainable, True))


def wrap_ddp(chunks, tc):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                            use_distributed_optimizer=True, check_for_nan_in_grad=True)
    return [DistributedDataParallel(config=tc, ddp_config=ddp_cfg, module=c, disable_bucketing=i > 0)
            for i, c in enumerate(chunks)]


def build_optimizer(run: RunConfig, stage: StageConfig, model, dtype: torch.dtype):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    t = run.train
    cfg = OptimizerConfig(
        optimizer="adam", lr=0.0, min_lr=0.0,
        weight_decay=t.weight_decay if stage.weight_decay is None else stage.weight_decay,
        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2 if stage.adam_beta2 is None else stage.adam_beta2,
        adam_eps=t.adam_eps, clip_grad=t.grad_clip, bf16=dtype == torch.bfloat16,
        params_dtype=dtype, use_distributed_optimizer=True)
    return get_megatron_optimizer(cfg, model)


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


def _reduce_losses(losses: list[dict], parallel: Parallel, mix: dict) -> tuple[float, int, dict]:
    """Global (mean loss, loss-token count, mixture position counts) of one step: losses come
    from the last pipeline stage's microbatch reports, mixture counts from each DP rank's loader."""
    from megatron.core import parallel_state as ps

    total = torch.zeros(2 + len(_MIX_KEYS), dtype=torch.float64)
    for rec in losses:
        total[:2] += rec["loss"].double().cpu()
    total[2:] = torch.tensor([float(mix.get(k, 0)) for k in _MIX_KEYS], dtype=torch.float64)
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        dist.all_reduce(total, group=parallel.dp_group)
    # share with the other pipeline stages so every rank can log / stop consistently
    src = ps.get_pipeline_model_parallel_last_rank()
    dist.broadcast(total, src=src, group=parallel.pp_group)
    loss = (total[0] / total[1].clamp(min=1)).item()
    return loss, int(total[1].item()), {k: int(v) for k, v in zip(_MIX_KEYS, total[2:].tolist())}


class StageTrainer:
    """Runs one stage to its end (or to ``stop_after`` steps, for tests of interrupted runs)."""

    def __init__(self, run: RunConfig, stage: StageConfig, sched: StageSchedule, parallel: Parallel,
                 loader_factory: LoaderFactory, log: Callable[[str], None] = print):
        self.run, self.stage, self.sched, self.parallel = run, stage, sched, parallel
        self.loader_factory, self.log = loader_factory, log
        self.run_dir = Path(run.run_dir)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", parallel.is_logging_rank)

    def _num_microbatches(self) -> int:
        t = self.run.train
        per = t.micro_batch_size * self.parallel.dp
        if t.global_batch_size % per:
            raise ValueError(f"train.global_batch_size={t.global_batch_size} is not divisible by "
                             f"micro_batch_size*dp = {t.micro_batch_size}*{self.parallel.dp}")
        return t.global_batch_size // per

    def train(self, stop_after: Optional[int] = None, fault: Optional[str] = None,
              observer: Optional[Callable[[str, int, list], None]] = None) -> StageOutcome:
        """Train to the end of the stage.

        ``stop_after`` ends early after that many steps. ``fault`` is fault injection for resume
        tests: ``exit_after_step:K`` kills the process right after step K (no cleanup, no
        checkpoint), ``exit_in_checkpoint:K`` kills it in the middle of writing step K's
        checkpoint. ``observer(stage, step, model)`` is called when the step's gradients are
        final, before the optimizer uses them (parity tests read them there)."""
        fault_kind, _, fault_step = (fault or "").partition(":")
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.pipeline_parallel import get_forward_backward_func

        run, stage, par = self.run, self.stage, self.parallel
        T = self.sched.steps
        fractions: dict[int, list[float]] = {}  # a short stage can hit several fractions at one step
        for f, k in checkpoint_steps(stage, T):
            fractions.setdefault(k, []).append(f)
        done = ckpt.latest(run.run_dir, stage.name)
        if done is not None and done.step >= T:
            self.log(f"[{stage.name}] complete ({T} steps), skipping")
            return StageOutcome(stage.name, T, None, skipped=True)
        ckpt.clean_partial(run.run_dir, stage.name)

        dtype = model_dtype(run)
        chunks, tc = build_model(run, par, dtype)
        set_trainable(chunks, stage.trainable)
        model = wrap_ddp(chunks, tc)
        optimizer = build_optimizer(run, stage, model, dtype)
        tc.finalize_model_grads_func = finalize_model_grads
        tc.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
        tc.grad_sync_func = None

        nmb = self._num_microbatches()
        loader = self.loader_factory(stage, par, nmb)
        start = 0
        if done is not None:
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
        S = run.stage_seq_length(stage)
        layout = StepLayout(S, run.train.micro_batch_size, pipelined=par.pp > 1)
        forward_step = make_forward_step(z_loss=run.model.z_loss, tp_group=par.tp_group,
                                         device=par.device, layout=layout)
        p2p_seq, p2p_mb = layout.p2p_shape  # packed rows travel flattened: [B·S, 1, d]
        step_tokens = run.train.global_batch_size * S
        last_loss = None
        end = T if stop_after is None else min(T, start + stop_after)
        wd = run.train.weight_decay if stage.weight_decay is None else stage.weight_decay
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
            ok, grad_norm, _ = optimizer.step()
            loss, n_loss, mix = _reduce_losses(losses, par, getattr(loader, "last_stats", {}))
            dt = time.perf_counter() - t0
            last_loss = loss
            rec = {"stage": stage.name, "step": step + 1, "loss": loss, "lr": lr,
                   "tokens": step_tokens, "loss_tokens": n_loss,
                   "grad_norm": None if grad_norm is None else float(grad_norm),
                   "tokens_per_s": step_tokens / dt,
                   # the stage's image-text ratio (positions of image samples) and pure patch share
                   "image_text_ratio": mix["image_sample_positions"] / step_tokens,
                   "patch_fraction": mix["patch_positions"] / step_tokens}
            self.metrics.write(rec)
            if par.is_logging_rank and ((step + 1) % run.train.log_every == 0 or step + 1 == T):
                self.log(f"[{stage.name}] step {step + 1}/{T} loss {loss:.4f} lr {lr:.3e} "
                         f"grad {rec['grad_norm'] or 0:.3f} tok/s {rec['tokens_per_s']:.0f}")
            k = step + 1
            if fault_kind == "exit_after_step" and k == int(fault_step):
                import os

                os._exit(17)
            periodic = stage.save_every and k % stage.save_every == 0
            if k in fractions or periodic or k == T:
                meta = {"stage": stage.name, "step": k, "steps": T, "fractions": fractions.get(k, []),
                        "tokens": k * step_tokens, "seed": run.seed}
                path = ckpt.stage_dir(run.run_dir, stage.name) / f"step_{k:07d}"
                ckpt.save(path, model, optimizer, meta, loader.state_dict(), par.dp_rank,
                          write_loader=par.tp_rank == 0 and par.pp_rank == 0,
                          exit_before_commit=fault_kind == "exit_in_checkpoint" and k == int(fault_step),
                          run_config=run, tokenizer=run.data.resolve(run.data.tokenizer))
                ckpt.prune(run.run_dir, stage.name, set(fractions))
        return StageOutcome(stage.name, end, last_loss)
