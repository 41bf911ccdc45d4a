"""Building the model of a recipe for a parallel layout and backend, and loading one to use.

Why here and not in the trainer: training, evaluation, OpenLM conversion, export and the
benchmarks all need "the model chunks of this rank for this run config"; the one way to make
them (megatron TransformerConfig from the recipe, one chunk per virtual pipeline stage,
layout-independent initialisation, the parallel device) lives in this module, and
:func:`load_for_inference` adds a checkpoint's weights (megavlm.checkpoint_format) without
touching megavlm.train.

The TransformerConfig a caller passes to :func:`build_chunks` is never changed: the chunks are
built from, and keep, a copy (megavlm.parallel.megatron_compat adjusts that copy after the build).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional

import torch

from megavlm.config import ModelConfig, RunConfig
from megavlm.parallel.state import Parallel


def model_dtype(run: RunConfig) -> torch.dtype:
    """Parameter dtype for ``precision.dtype`` on this host (auto: bf16 where the GPU has it)."""
    p = run.precision.dtype
    if p == "fp32":
        return torch.float32
    bf16_ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if p == "bf16":
        if not bf16_ok and torch.cuda.is_available():
            raise RuntimeError("precision.dtype=bf16 but this GPU has no bf16 support")
        return torch.bfloat16
    return torch.bfloat16 if bf16_ok else torch.float32


INFERENCE_DTYPE_ENV = "MEGAVLM_INFERENCE_DTYPE"
"""Overrides the dtype evaluation and generation load a checkpoint in: ``fp32``, ``bf16`` or
``fp16`` (default: :func:`inference_dtype`)."""

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def _cuda_bf16() -> tuple[bool, bool]:
    """(a CUDA GPU is usable, it has bf16)."""
    cuda = torch.cuda.is_available()
    return cuda, cuda and torch.cuda.is_bf16_supported()


def inference_dtype(run: RunConfig) -> torch.dtype:
    """The dtype a checkpoint of ``run`` is evaluated in: on CUDA the precision it trained in
    (``precision.dtype``; auto = bf16 where the GPU has it, fp8 runs keep bf16 weights), fp32 on a
    CPU; ``MEGAVLM_INFERENCE_DTYPE`` overrides both."""
    forced = os.environ.get(INFERENCE_DTYPE_ENV, "").strip().lower()
    if forced:
        if forced not in _DTYPES:
            raise ValueError(f"{INFERENCE_DTYPE_ENV}={forced!r}: choose one of fp32, bf16, fp16")
        return _DTYPES[forced]
    cuda, bf16_ok = _cuda_bf16()
    if not cuda or run.precision.dtype == "fp32":
        return torch.float32
    if run.precision.dtype == "bf16" and not bf16_ok:
        raise RuntimeError(f"the checkpoint trained in bf16 but this GPU has no bf16; set "
                           f"{INFERENCE_DTYPE_ENV}=fp32 to evaluate it in fp32")
    return torch.bfloat16 if bf16_ok else torch.float32


def build_chunks(config, model: ModelConfig, vpp: Optional[int], backend: str = "local"):
    """(this rank's model chunks, the TransformerConfig they were built with and keep).

    One chunk per virtual pipeline stage (one without interleaving). ``config`` itself is left
    as it was: the chunks get a copy, which is what megatron's schedules and finalize_model_grads
    read (through the chunks) and what a trainer sets its hooks on."""
    from megatron.core import parallel_state as ps

    from megavlm.model.vlm import VLM
    from megavlm.parallel.megatron_compat import keep_split_qk_gains_out_of_tp_reduction

    built = dataclasses.replace(config)
    chunks = []
    for vp in range(vpp or 1):
        vp_stage = vp if vpp else None
        chunks.append(VLM(built, model, backend=backend, vp_stage=vp_stage,
                          pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                          post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)))
    keep_split_qk_gains_out_of_tp_reduction(built)
    return chunks, built


def build_model(run: RunConfig, parallel: Parallel, dtype: torch.dtype, backend: Optional[str] = None):
    """(the model chunks of this rank, unwrapped and initialised from the run seed, on the
    parallel device; their TransformerConfig). ``backend`` overrides ``run.model.backend``
    (auto = TE when TE and a GPU are usable, else local)."""
    from megavlm.model.init import initialize
    from megavlm.model.specs import select_backend, transformer_config

    backend = select_backend(backend or run.model.backend)
    t = run.precision
    tc = transformer_config(run.model, run.parallel, dtype=dtype, batch_p2p_comm=parallel.p2p_batched,
                            backend=backend, fp8=t.fp8, fp8_format=t.fp8_format,
                            fp8_amax_history_len=t.fp8_amax_history_len)
    chunks, tc = build_chunks(tc, run.model, parallel.vpp, backend=backend)
    initialize(chunks, run.model, run.seed, parallel.tp_rank, parallel.tp)
    for c in chunks:
        c.to(parallel.device)
    return chunks, tc


def load_for_inference(path: str | Path, parallel: Optional[Parallel] = None,
                       dtype: Optional[torch.dtype] = None):
    """(model chunks in eval mode, RunConfig) of a checkpoint directory, for one process.

    ``dtype`` None: :func:`inference_dtype` (the training precision on CUDA, fp32 on a CPU).
    Builds the model from the checkpoint's own config.yaml at TP = PP = 1 (checkpoints load at
    any layout); initialises a single-process parallel context when none is given."""
    from megavlm.checkpoint_format import CONFIG, load_model_weights, require_complete
    from megavlm.config import load_config

    path = Path(path)
    require_complete(path, config=True)
    run = load_config(path / CONFIG)
    run.parallel.tp = run.parallel.pp = 1
    run.parallel.vpp, run.parallel.sequence_parallel = None, False
    if parallel is None:
        parallel = Parallel.initialize(run.parallel, run.seed)
    chunks, _ = build_model(run, parallel, dtype or inference_dtype(run))
    load_model_weights(path, chunks)
    for c in chunks:
        c.eval()
    return chunks, run
