"""Process groups of a run, behind one object that is passed explicitly.

megatron-core keeps its process groups in module globals (``parallel_state``); megavlm code never
reaches for them. :class:`Parallel` initialises torch.distributed (gloo without CUDA, nccl with
it), megatron's groups and its RNG tracker, and hands out the groups, ranks and device that the
model, the data loader and the training loop need. Initialising it also checks the megatron-core
pin and applies megavlm.parallel.megatron_compat (its CPU shims only when CUDA is absent).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megavlm.config import ParallelConfig
from megavlm.parallel import megatron_compat


@dataclass(frozen=True)
class Parallel:
    """The parallel layout of this process and its groups."""

    tp: int
    pp: int
    vpp: Optional[int]
    dp: int
    rank: int
    world_size: int
    backend: str
    device: torch.device
    sequence_parallel: bool = False

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def initialize(cls, cfg: ParallelConfig, seed: int) -> "Parallel":
        """Start torch.distributed from the torchrun environment (or as a single process) and
        build megatron-core's groups for ``cfg``. ``seed`` seeds megatron's RNG tracker."""
        cuda = torch.cuda.is_available()
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if cuda else "gloo")
        if backend == "nccl" and not cuda:
            raise RuntimeError("parallel.backend=nccl needs CUDA; use gloo (or auto) on CPU")
        megatron_compat.apply()
        if not dist.is_initialized():
            rank = int(os.environ.get("RANK", "0"))
            world = int(os.environ.get("WORLD_SIZE", "1"))
            if cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            timeout = datetime.timedelta(minutes=10)
            if world == 1 and "MASTER_PORT" not in os.environ:
                # one process: an in-memory store, no TCP port to race other processes for
                dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0,
                                        world_size=1, timeout=timeout)
            else:
                if "MASTER_PORT" not in os.environ:
                    raise RuntimeError("WORLD_SIZE > 1 but MASTER_PORT is unset: launch with torchrun")
                os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
                dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timeout)
        world = dist.get_world_size()
        model_parallel = cfg.tp * cfg.pp
        if world % model_parallel:
            raise RuntimeError(f"world size {world} is not divisible by tp*pp = {cfg.tp}*{cfg.pp}")
        from megatron.core import parallel_state as ps
        from megatron.core import tensor_parallel

        if not ps.model_parallel_is_initialized():
            ps.initialize_model_parallel(
                tensor_model_parallel_size=cfg.tp,
                pipeline_model_parallel_size=cfg.pp,
                virtual_pipeline_model_parallel_size=cfg.vpp,
                # gloo copies of the DP groups whenever there are several processes: checkpoints
                # gather the optimizer state on the host over them
                # (megavlm.train.checkpoint.optimizer_metadata); one process needs none
                create_gloo_process_groups=(backend == "gloo" or world > 1),
            )
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        return cls(tp=cfg.tp, pp=cfg.pp, vpp=cfg.vpp, dp=world // model_parallel,
                   rank=dist.get_rank(), world_size=world, backend=backend, device=device,
                   sequence_parallel=cfg.sequence_parallel)

    def destroy(self) -> None:
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()

    # -- ranks and groups ----------------------------------------------------------------------

    @property
    def _ps(self):
        from megatron.core import parallel_state as ps

        return ps

    @property
    def tp_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_rank()

    @property
    def pp_rank(self) -> int:
        return self._ps.get_pipeline_model_parallel_rank()

    @property
    def dp_rank(self) -> int:
        return self._ps.get_data_parallel_rank()

    @property
    def tp_group(self):
        return self._ps.get_tensor_model_parallel_group()

    @property
    def pp_group(self):
        return self._ps.get_pipeline_model_parallel_group()

    @property
    def dp_group(self):
        return self._ps.get_data_parallel_group()

    @property
    def is_first_pp_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_pp_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_logging_rank(self) -> bool:
        """The rank that prints and writes run files: last pipeline stage, tp 0, dp 0 (it sees the loss)."""
        return self.is_last_pp_stage and self.tp_rank == 0 and self.dp_rank == 0

    @property
    def p2p_batched(self) -> bool:
        """Batched p2p gives silently wrong gradients for interleaved PP over gloo: only with nccl."""
        return self.backend == "nccl"

    def barrier(self) -> None:
        dist.barrier()
