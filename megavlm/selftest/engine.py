"""The selftest's checks of what a real run does first, beyond raw speed: a checkpoint written and
the next step resumed from it bitwise, and a short generation with the KV cache.

Both train the **tiny** recipe's model on synthetic packed rows (several documents per row, so
document boundaries and, on a GPU with torch >= 2.11, the varlen attention kernel are used) in a
temporary run folder the caller owns (:func:`megavlm.selftest.run.main` deletes it at the end and
on SIGINT/SIGTERM: the selftest never leaves a checkpoint behind). The model is small on purpose:
the checkpoint path (megatron dist_checkpointing, the DistributedOptimizer's state, the data
position) is the same as at 1.4B, but the write takes seconds, not a 20 GB write.

The resume check: a run of 4 steps keeps its checkpoint at step 2 (fraction 0.5) and goes on to
step 3; a second trainer in the same folder resumes from that checkpoint and takes step 3. Step
3's loss and every gradient must be equal. On a CPU that is bitwise; on CUDA some kernels
(flash-attention backward, atomics) are not deterministic, so a difference there is reported with
its size and fails only above 1e-3 relative.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Optional

import torch

from megavlm.selftest.checks import ROOT, Check, timed
from megavlm.selftest.environment import Environment

STEPS = 4  # the stage's length; the checkpoint is kept at fraction 0.5 (step 2)
RESUME_AT = 2


def _recipe(env: Environment, workdir: Path, config: Optional[Path]):
    """(run config, stage, stage plan) of the tiny recipe's one packed-row stage in ``workdir``."""
    from megavlm.bench import throughput as tp
    from megavlm.config import load_config
    from megavlm.train.plan import plan_run

    config = config or ROOT / "launch" / "configs" / "tiny.yaml"
    base = load_config(config, ["train.global_batch_size=8", "train.micro_batch_size=4"])
    prec = "bf16" if env.has_cuda else "fp32"
    run = tp.case_config(base, tp.Case("packed", prec, "synthetic"), STEPS - 2, str(workdir))
    per_step = run.train.global_batch_size * run.model.seq_length
    stage = dataclasses.replace(run.stages[0], tokens=STEPS * per_step, checkpoint_fractions=[0.5, 1.0])
    # the local layer spec: its attention seat holds the KV cache (TE's does not)
    run = dataclasses.replace(run, stages=[stage], model=dataclasses.replace(run.model, backend="local"))
    return run, stage, plan_run(run)[stage.name]


def _trainer(run, plan, parallel):
    from megavlm.bench.throughput import SyntheticRows
    from megavlm.train.loop import StageTrainer

    factory = lambda st, par, nmb: SyntheticRows(run, "packed", nmb, par.dp_rank)  # noqa: E731
    return StageTrainer(run, plan, parallel, factory, log=lambda s: None)


def _grads_at(step: int, into: dict):
    """An observer keeping a host copy of every gradient at ``step``."""
    def observe(stage, k, model):
        if k == step:
            for i, chunk in enumerate(model):
                for name, p in chunk.named_parameters():
                    g = getattr(p, "main_grad", None)
                    if g is not None:
                        into[f"{i}.{name}"] = g.detach().float().cpu().clone()
    return observe


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@timed
def checkpoint_resume(env: Environment, size: str, workdir: Path, config: Optional[Path] = None) -> Check:
    """Write a checkpoint, resume from it in a fresh trainer, take the next step: same loss and
    gradients as the run that never stopped."""
    from megavlm.parallel.state import Parallel
    from megavlm.train import checkpoint as ckpt

    name = "checkpoint write + resume"
    run, stage, plan = _recipe(env, workdir, config)
    parallel = Parallel.initialize(run.parallel, run.seed)
    try:
        straight: dict = {}
        t0 = time.perf_counter()
        a = _trainer(run, plan, parallel).train(stop_after=RESUME_AT + 1,
                                                        observer=_grads_at(RESUME_AT + 1, straight))
        t_straight = time.perf_counter() - t0
        kept = ckpt.latest(run.run_dir, stage.name)
        if kept is None or kept.step != RESUME_AT:
            return Check(name, "failed", f"expected the checkpoint of step {RESUME_AT}, found "
                                         f"{kept.step if kept else 'none'}")
        size_b = _dir_bytes(kept.path)
        resumed: dict = {}
        t0 = time.perf_counter()
        b = _trainer(run, plan, parallel).train(stop_after=1,
                                                        observer=_grads_at(RESUME_AT + 1, resumed))
        t_resume = time.perf_counter() - t0
    finally:
        parallel.destroy()
    if sorted(straight) != sorted(resumed) or not straight:
        return Check(name, "failed", f"gradients of step {RESUME_AT + 1}: {len(straight)} tensors "
                                     f"straight, {len(resumed)} after the resume")
    exact = a.last_loss == b.last_loss and all(torch.equal(straight[k], resumed[k]) for k in straight)
    where = f"{size_b / 2 ** 20:.1f} MiB checkpoint at step {RESUME_AT} ({stage.name} rows, " \
            f"{run.precision.dtype}); {RESUME_AT + 1} steps + write {t_straight:.1f} s, load + 1 step " \
            f"{t_resume:.1f} s"
    if exact:
        return Check(name, "passed", f"step {RESUME_AT + 1} after the resume is bitwise equal "
                                     f"(loss {b.last_loss:.6f}, {len(straight)} gradients); {where}")
    rel_loss = abs(a.last_loss - b.last_loss) / max(abs(a.last_loss), 1e-30)
    rel_grad = max(float((straight[k] - resumed[k]).norm() / straight[k].norm().clamp_min(1e-30))
                   for k in straight)
    worst = max(rel_loss, rel_grad)
    detail = (f"step {RESUME_AT + 1} after the resume is not bitwise equal: loss {a.last_loss!r} vs "
              f"{b.last_loss!r}, largest relative gradient difference {rel_grad:.1e}; {where}")
    if env.has_cuda and math.isfinite(worst) and worst <= 1e-3:
        return Check(name, "passed", detail + " (within CUDA kernel nondeterminism, <= 1e-3)")
    return Check(name, "failed", detail)


class SyntheticIdsTokenizer:
    """The ids the synthetic rows are made of (megavlm.data.tokenizer.SENTENCEPIECE_IDS and plain
    ordinary ids): what :class:`megavlm.eval.runner.CheckpointModel` needs to generate from a
    model trained on them. Text is the ids written out."""

    def __init__(self, vocab_size: int):
        from megavlm.data.tokenizer import SENTENCEPIECE_IDS

        self.special = SENTENCEPIECE_IDS
        self.vocab_size = vocab_size
        self.eod, self.pad, self.sep, self.image = (SENTENCEPIECE_IDS.eod, SENTENCEPIECE_IDS.pad,
                                                    SENTENCEPIECE_IDS.sep, SENTENCEPIECE_IDS.image)

    def decode(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]


@timed
def generation(env: Environment, size: str, workdir: Path, config: Optional[Path] = None) -> Check:
    """Greedy generation from the checkpoint with the KV cache: the same tokens as re-running the
    whole prefix per token (fp32), and the cached speed in the dtype evaluation loads it in."""
    from megavlm.data.tokenizer import FIRST_ORDINARY_ID
    from megavlm.eval.runner import CheckpointModel
    from megavlm.model.build import inference_dtype, load_for_inference
    from megavlm.parallel.state import Parallel
    from megavlm.train import checkpoint as ckpt

    name = "cached generation"
    run, stage, plan = _recipe(env, workdir, config)
    parallel = Parallel.initialize(run.parallel, run.seed)
    try:
        found = ckpt.latest(run.run_dir, stage.name)
        if found is None:  # the checkpoint check did not run: make the checkpoint here
            _trainer(run, plan, parallel).train(stop_after=RESUME_AT)
            found = ckpt.latest(run.run_dir, stage.name)
        g = torch.Generator().manual_seed(run.seed)
        new = 8 if size == "small" else 32
        prompts = [torch.randint(FIRST_ORDINARY_ID, run.model.vocab_size, (n,), generator=g).tolist()
                   for n in (5, 17, 40)]
        tok = SyntheticIdsTokenizer(run.model.vocab_size)
        chunks, loaded = load_for_inference(found.path, parallel, dtype=torch.float32)
        m32 = CheckpointModel(chunks, loaded, tok, found.path, batch_size=len(prompts), parallel=parallel)
        if not m32._cache_usable():
            return Check(name, "failed", "the KV cache is not usable with this model's attention")
        cached = m32.generate_ids(prompts, max_new_tokens=new, cache=True)
        plain = m32.generate_ids(prompts, max_new_tokens=new, cache=False)
        del m32, chunks
        dtype = inference_dtype(loaded)
        chunks, loaded = load_for_inference(found.path, parallel)
        model = CheckpointModel(chunks, loaded, tok, found.path, batch_size=len(prompts), parallel=parallel)
        model.generate_ids(prompts, max_new_tokens=2, cache=True)  # warm-up
        if parallel.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate_ids(prompts, max_new_tokens=new, cache=True)
        if parallel.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    finally:
        parallel.destroy()
    made = sum(len(x) for x in out)
    speed = (f"{len(prompts)} prompts x {new} new tokens in {dtype} (the checkpoint's inference "
             f"dtype here): {made / dt:,.0f} tokens/s")
    if cached != plain:
        first = next(i for i, (a, b) in enumerate(zip(cached, plain)) if a != b)
        return Check(name, "failed", f"cached and uncached greedy tokens differ for prompt {first}: "
                                     f"{cached[first]} vs {plain[first]}; {speed}")
    return Check(name, "passed", f"cached greedy tokens equal re-running the prefix (fp32, "
                                 f"{sum(len(x) for x in cached)} tokens); {speed}")
