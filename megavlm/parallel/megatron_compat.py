"""Every megatron-core workaround of megavlm, pinned to the version it answers (0.19.2).

Why one module: each workaround patches or steps around a specific line of one megatron-core
release, so they must be found, re-checked and dropped together when the pin moves. Every shim
names the megatron-core file (and line, in 0.19.2) it answers; :func:`check_version` refuses any
other release on every host, CUDA or not. ``tests/parallel/test_megatron_compat.py`` checks the
behaviour of each shim.

On every host:

* :func:`check_version` — the pin.
* :func:`install_te_import_guard` — a Transformer Engine that is installed but fails to load
  with something other than ImportError (OSError from a missing driver or library) would break
  megatron-core's own imports, which catch only ImportError; it is turned into an ImportError so
  megatron falls back to torch (installed by ``import megavlm``, before megatron is imported).
* :func:`keep_split_qk_gains_out_of_tp_reduction` — megatron all-reduces qk-norm gain grads.
* :func:`prime_optimizer_state`, :func:`adam_step_is_not_a_shard`, :func:`unshare_adam_steps`,
  :func:`in_process_write_queue` — DistributedOptimizer checkpointing with torch's Adam.

Only without CUDA (:func:`apply` on a CPU host): megatron is written for CUDA, so to train and test
the same code on CPU over gloo its CUDA assumptions are answered here. Most of these shims share
one mechanism: the megatron module's global ``torch`` is replaced by a *CPU view of torch*
(:class:`_CpuTorch`) that forwards everything to torch except ``torch.cuda`` (streams, events,
current_device, RNG state and synchronize answered for the CPU) and tensor factories called with
``device="cuda"`` (made on the CPU). The rest are targeted patches of single functions.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import sys
import types
import warnings
from typing import Any, Callable, Optional

MEGATRON_CORE_VERSION = "0.19.2"
_applied = False


def needed() -> bool:
    """Whether the CPU shims apply (no CUDA device)."""
    import torch

    return not torch.cuda.is_available()


def check_version(found: Optional[str] = None) -> None:
    """Raise unless megatron-core is the release these workarounds were written against."""
    if found is None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            found = version("megatron-core")
        except PackageNotFoundError:
            raise RuntimeError(f"megatron-core is not installed: install "
                               f"megatron-core=={MEGATRON_CORE_VERSION} (make install)") from None
    if found.split("+")[0] != MEGATRON_CORE_VERSION:
        raise RuntimeError(f"megavlm's megatron-core workarounds (megavlm/parallel/megatron_compat.py) "
                           f"are written for megatron-core {MEGATRON_CORE_VERSION}, found {found}: "
                           f"install megatron-core=={MEGATRON_CORE_VERSION} (make install)")


# ---------------------------------------------------------------------------------------------
# a Transformer Engine that is installed but does not load

_TE_TOP_LEVEL = ("transformer_engine", "transformer_engine_torch")


class _GuardedLoader:
    """Runs the real loader; any failure other than ImportError becomes an ImportError."""

    def __init__(self, inner, guard: "_BrokenTEGuard"):
        self._inner, self._guard = inner, guard

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def create_module(self, spec):
        return self._guard.call(self._inner.create_module, spec)

    def exec_module(self, module):
        return self._guard.call(self._inner.exec_module, module)


class _BrokenTEGuard:
    """A meta-path finder wrapping the loaders of Transformer Engine's modules.

    megatron-core imports TE in about a hundred places inside ``try: … except ImportError`` —
    e.g. utils.py:56-64 (``import transformer_engine``, reached by ``import megatron.core``),
    optimizer/__init__.py:13-35 (FusedAdam, else torch's AdamW), optimizer/distrib_optimizer.py:21-33,
    optimizer/clip_grads.py:9-33. A TE whose shared libraries cannot load (no driver, a CUDA
    mismatch) raises OSError instead, which escapes all of them and breaks even the local,
    TE-free path. After such a failure TE is reported missing (ImportError, chained to the real
    error, with one warning) for the rest of the process — as ModuleNotFoundError, the narrowest
    class some of those imports catch (tensor_parallel/random.py:84-91)."""

    def __init__(self):
        self.failure: Optional[BaseException] = None

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in _TE_TOP_LEVEL:
            return None
        if self.failure is not None:
            raise ModuleNotFoundError(f"Transformer Engine is installed but failed to load: "
                                      f"{self.failure!r}", name=name)
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _GuardedLoader(spec.loader, self)
        return spec

    def call(self, fn, arg):
        try:
            return fn(arg)
        except ImportError:
            raise
        except Exception as e:  # noqa: BLE001 — what megatron does not catch is the point
            self.failure = e
            for mod in [m for m in sys.modules if m.split(".")[0] in _TE_TOP_LEVEL]:
                sys.modules.pop(mod, None)
            warnings.warn(f"Transformer Engine is installed but fails to load ({e!r}); megavlm "
                          f"continues without it (local layer spec, torch's AdamW)", RuntimeWarning,
                          stacklevel=2)
            raise ModuleNotFoundError(f"Transformer Engine is installed but fails to load: {e!r}") from e


def install_te_import_guard() -> None:
    """Put :class:`_BrokenTEGuard` first on ``sys.meta_path`` (idempotent; imports nothing)."""
    if not any(isinstance(f, _BrokenTEGuard) for f in sys.meta_path):
        sys.meta_path.insert(0, _BrokenTEGuard())


# ---------------------------------------------------------------------------------------------
# model building


def keep_split_qk_gains_out_of_tp_reduction(built_config) -> None:
    """Switch off ``qk_layernorm`` on the TransformerConfig the model chunks were built with.

    megatron's finalize_model_grads (distributed/finalize_model_grads.py:451-453) sums the grads
    of every parameter named q_layernorm/k_layernorm over the TP group when config.qk_layernorm
    is set — right for its per-head norm, whose gain is replicated, wrong for megavlm's
    full-width norm (megavlm.model.norms.FullWidthQKNorm), whose gain is split across the group
    like the heads. The flag is read only while building attention (transformer/attention.py:1700)
    and by that reduction, so it is switched off once built. Call it on the config the chunks own
    (megavlm.model.build makes that a copy), never on a caller's."""
    built_config.qk_layernorm = False


# ---------------------------------------------------------------------------------------------
# DistributedOptimizer checkpoints with torch's Adam (no apex / TE FusedAdam)


def prime_optimizer_state(optimizer) -> None:
    """Give every parameter an Adam state with a ``step`` before a load.

    Without apex/TE, megatron's DistributedOptimizer.state_dict (optimizer/distrib_optimizer.py:837)
    reads ``state['step']`` of every parameter, but its init_state_fn for torch's Adam
    (optimizer/__init__.py:588) creates only exp_avg/exp_avg_sq — so loading into a fresh
    optimizer fails. The loaded checkpoint overwrites these placeholders."""
    import torch

    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    for o in inner:
        if getattr(o, "init_state_fn", None) is not None:
            o.init_state_fn(o.optimizer, o.config)
        for group in o.optimizer.param_groups:
            for p in group["params"]:
                o.optimizer.state[p].setdefault("step", torch.tensor(0.0))


@contextlib.contextmanager
def adam_step_is_not_a_shard():
    """Without apex/TE, megatron's DistributedOptimizer.load_state_dict (distrib_optimizer.py:1025-1032)
    puts torch Adam's scalar ``step`` into every parameter state, and then
    _set_main_param_and_optimizer_states (distrib_optimizer.py:1222) expects a loaded shard for
    every state tensor — ``step`` has none (the loader skips it on purpose at :2390), so loading
    fails with KeyError('step'). Marking it absent lets the shard copy skip it."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def patched(self, model_param, tensors):
        return original(self, model_param, {"step": None, **tensors})

    DistributedOptimizer._set_main_param_and_optimizer_states = patched
    try:
        yield
    finally:
        DistributedOptimizer._set_main_param_and_optimizer_states = original


def unshare_adam_steps(optimizer) -> None:
    """megatron (distrib_optimizer.py:1029-1032) gives every parameter the *same* ``step`` tensor;
    torch's Adam increments each parameter's step in place, so a shared tensor would advance once
    per parameter per step and corrupt the bias correction after a resume. Give each its own."""
    import torch

    for o in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in o.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


@contextlib.contextmanager
def in_process_write_queue():
    """Our saves are synchronous: megatron writes the shards from threads of this process and
    collects their results through a queue. Its default queue lives in a multiprocessing Manager
    (dist_checkpointing/strategies/filesystem_async.py:53-66): a spawned server process per rank
    that costs a second to start and outlives a killed trainer, holding its stdout open. A
    thread-safe queue.Queue does the same job in-process."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    original = fa.get_write_results_queue
    q: queue.Queue = queue.Queue()
    fa.get_write_results_queue = lambda *a, **k: q
    try:
        yield
    finally:
        fa.get_write_results_queue = original


# ---------------------------------------------------------------------------------------------
# CPU only: the CPU view of torch


def _cpu_device(device: Any) -> Any:
    import torch

    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    if isinstance(device, int):  # torch.cuda.current_device() style index
        return "cpu"
    return device


class _DummyStream:
    """Stands in for torch.cuda.Stream / current_stream(): CPU work is already ordered."""

    def __init__(self, *_, **__):
        pass

    def wait_stream(self, *_):
        pass

    def wait_event(self, *_):
        pass

    def record_event(self, event=None):
        return event or _DummyEvent()

    def synchronize(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _DummyEvent(_DummyStream):
    def record(self, *_):
        pass

    def query(self):
        return True

    def elapsed_time(self, *_):
        return 0.0


class _CpuCuda(types.ModuleType):
    """``torch.cuda`` as megatron's CPU-reachable code paths need it."""

    def __init__(self):
        super().__init__("torch.cuda (megavlm CPU view)")
        import torch

        self._real = torch.cuda
        self.Stream = _DummyStream
        self.Event = _DummyEvent
        self.current_device = lambda: "cpu"
        self.current_stream = lambda *a, **k: _DummyStream()
        self.default_stream = lambda *a, **k: _DummyStream()
        self.stream = lambda *a, **k: contextlib.nullcontext()
        self.synchronize = lambda *a, **k: None
        self.empty_cache = lambda: None
        self.get_rng_state = lambda *a, **k: torch.get_rng_state()
        self.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
        self.manual_seed = lambda seed: torch.manual_seed(seed)
        self.memory_allocated = lambda *a, **k: 0
        self.max_memory_allocated = lambda *a, **k: 0
        self.nvtx = types.SimpleNamespace(range_push=lambda *a, **k: None,
                                          range_pop=lambda *a, **k: None,
                                          range=lambda *a, **k: contextlib.nullcontext())

    def __getattr__(self, name):
        return getattr(self._real, name)


_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "ones_like",
              "empty_like", "full_like", "randn", "rand", "as_tensor")


class _CpuTorch(types.ModuleType):
    """torch, with ``torch.cuda`` and ``device="cuda"`` factory calls answered on the CPU."""

    def __init__(self):
        super().__init__("torch (megavlm CPU view)")
        import torch

        self._real = torch
        self.cuda = _CpuCuda()
        for name in _FACTORIES:
            setattr(self, name, self._wrap_factory(getattr(torch, name)))
        real_autocast = torch.autocast
        self.autocast = lambda device_type, *a, **k: real_autocast(
            "cpu" if device_type == "cuda" else device_type, *a, **k)

    @staticmethod
    def _wrap_factory(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _cpu_device(kwargs["device"])
            return fn(*args, **kwargs)

        return wrapper

    def __getattr__(self, name):
        return getattr(self._real, name)


# Modules whose global ``torch`` becomes the CPU view, with what each needs it for (0.19.2).
CPU_TORCH_MODULES: dict[str, str] = {
    "megatron.core.models.common.embeddings.rotary_pos_embedding":
        "rotary_pos_embedding.py:162 moves inv_freq to torch.cuda.current_device()",
    "megatron.core.transformer.utils":
        "transformer/utils.py:39,44 allocate causal / sliding-window masks with device='cuda'",
    "megatron.core.tensor_parallel.random":
        "tensor_parallel/random.py:303-308 CudaRNGStatesTracker.add seeds and reads the CUDA RNG",
    "megatron.core.tensor_parallel.layers":
        "tensor_parallel/layers.py weights placed on torch.cuda.current_device()",
    "megatron.core.tensor_parallel.mappings":
        "tensor_parallel/mappings.py all-gather buffers on torch.cuda.current_device()",
    "megatron.core.utils":
        "utils.py GlobalMemoryBuffer.get_tensor allocates on torch.cuda.current_device(); "
        "utils.py:1332 l2 norm tensor on 'cuda'",
    "megatron.core.distributed.distributed_data_parallel":
        "distributed/distributed_data_parallel.py grad buffers and streams on CUDA",
    "megatron.core.distributed.param_and_grad_buffer":
        "distributed/param_and_grad_buffer.py buffers on torch.cuda.current_device(), "
        "line 1145 warm-up tensor on 'cuda', current_stream() for async grad reduce",
    "megatron.core.optimizer.optimizer":
        "optimizer/optimizer.py:315,690,698,702,1249 found_inf / scale tensors on 'cuda'",
    "megatron.core.optimizer.distrib_optimizer":
        "optimizer/distrib_optimizer.py shard buffers and gathers on torch.cuda.current_device()",
    "megatron.core.optimizer.clip_grads":
        "optimizer/clip_grads.py:96,108,112,180,231 norm accumulators on 'cuda'",
    "megatron.core.pipeline_parallel.schedules":
        "pipeline_parallel/schedules.py:749,1121,2292 total_num_tokens on 'cuda', :504 autocast('cuda')",
    "megatron.core.pipeline_parallel.p2p_communication":
        "pipeline_parallel/p2p_communication.py receive buffers on torch.cuda.current_device()",
    "megatron.core.pipeline_parallel.utils":
        "pipeline_parallel/utils.py:390 torch.cuda.Stream for communication",
    "megatron.core.parallel_state":
        "parallel_state.py:216 torch.cuda.synchronize in barrier helpers",
    "megatron.core.dist_checkpointing.exchange_utils":
        "dist_checkpointing/exchange_utils.py:97-109,329,339,506 exchange buffers on 'cuda'",
    "megatron.core.dist_checkpointing.strategies.filesystem_async":
        "dist_checkpointing/strategies/filesystem_async.py:248 torch.cuda.synchronize before writing",
    "megatron.core.dist_checkpointing.strategies.async_utils":
        "dist_checkpointing/strategies/async_utils.py:224,273,698 liveness tensors and synchronize on CUDA",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver":
        "dist_checkpointing/strategies/state_dict_saver.py:204 verify-reuse flag on 'cuda'",
}


# ---------------------------------------------------------------------------------------------
# targeted shims


def _stub_paged_stash_ops() -> None:
    """megatron/core/transformer/moe/ops/paged_stash.py:4 imports triton unconditionally, and
    pipeline_parallel/schedules.py:27 imports it through moe/paged_stash.py. The kernels serve MoE
    paged stashing only; without triton they raise if ever called."""
    name = "megatron.core.transformer.moe.ops.paged_stash"
    try:
        have_triton = importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a finder that refuses it, or a half-imported triton
        have_triton = False
    if name in sys.modules or have_triton:
        return
    mod = types.ModuleType(name)
    mod.GLOBAL_BLOCK_SIZE = 1024

    def _unavailable(*_a, **_k):
        raise RuntimeError("megatron MoE paged-stash kernels need triton (not installed)")

    mod.paged_stash_copy_kernel = _unavailable
    mod.paged_stash_pop_kernel = _unavailable
    sys.modules[name] = mod


def _patch_rng_state() -> None:
    """tensor_parallel/random.py:104-175 read and write the CUDA generator directly
    (_get_cuda_rng_state / _set_cuda_rng_state): use the CPU generator instead."""
    import torch
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)


@contextlib.contextmanager
def _tensors_act_as_cuda():
    """Inside the block, CPU tensors answer ``.type()`` as 'torch.cuda.*Tensor' and ``.cuda()``
    returns the tensor itself: for megatron functions that check or force the CUDA device."""
    import torch

    real_type, real_cuda = torch.Tensor.type, torch.Tensor.cuda

    def as_cuda_type(self, *args, **kwargs):
        out = real_type(self, *args, **kwargs)
        if not args and not kwargs and isinstance(out, str) and out.startswith("torch.") \
                and not out.startswith("torch.cuda."):
            return "torch.cuda." + out[len("torch."):]
        return out

    torch.Tensor.type = as_cuda_type
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.type, torch.Tensor.cuda = real_type, real_cuda


def _run_as_cuda(fn):
    @functools.wraps(fn)
    def inner(*a, **k):
        with _tensors_act_as_cuda():
            return fn(*a, **k)
    return inner


# (module, attribute path, what it answers): functions run under _tensors_act_as_cuda.
TENSOR_METHOD_SHIMS: list[tuple[str, str, str]] = [
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer._build_model_and_main_param_groups",
     "optimizer/distrib_optimizer.py:466 accepts only 'torch.cuda.*Tensor' params"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.get_parameter_state_dp_zero",
     "optimizer/distrib_optimizer.py:1374 send_tensor.cuda() when gathering optimizer state for a "
     "fully_reshardable checkpoint"),
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32",
     "optimizer/clip_grads.py:174 asserts grads are 'torch.cuda.FloatTensor'"),
    ("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32",
     "optimizer/optimizer.py imports clip_grad_by_total_norm_fp32 by name"),
]


def _patch_tensor_method_checks() -> None:
    for modname, path, _why in TENSOR_METHOD_SHIMS:
        owner: Any = importlib.import_module(modname)
        *parents, attr = path.split(".")
        for p in parents:
            owner = getattr(owner, p)
        raw = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
        if isinstance(raw, (staticmethod, classmethod)):
            setattr(owner, attr, type(raw)(_run_as_cuda(raw.__func__)))
        else:
            setattr(owner, attr, _run_as_cuda(raw))


class _DropMessage:
    """logging filter dropping one message."""

    def __init__(self, text: str):
        self.text = text

    def filter(self, record) -> bool:
        return self.text not in record.getMessage()


def _quiet_rng_fork_warning() -> None:
    """tensor_parallel/random.py:331 warns when the CPU RNG moves inside a tracker fork. On CPU the
    tracked 'CUDA' state *is* the CPU generator, so it moves by design: drop that one message."""
    import logging

    logging.getLogger("megatron.core.tensor_parallel.random").addFilter(
        _DropMessage("CPU RNG state changed within GPU RNG context"))


class _DoneWork:
    """A finished torch.distributed Work, for a collective that had nothing to exchange."""

    def wait(self, *_a, **_k):
        return True

    def is_completed(self):
        return True


def _one_rank(fn: Callable, copy: bool) -> Callable:
    import inspect

    import torch.distributed as dist

    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def inner(*args, **kwargs):
        group = sig.bind_partial(*args, **kwargs).arguments.get("group")
        if dist.get_world_size(group) != 1:
            return fn(*args, **kwargs)
        if copy:  # (output, input): one rank's reduce-scatter / all-gather is a copy
            out, inp = args[0], args[1]
            if out.data_ptr() != inp.data_ptr():
                out.copy_(inp)
        return _DoneWork() if kwargs.get("async_op") else None

    return inner


def _skip_single_rank_collectives() -> None:
    """A collective over a one-rank group exchanges nothing, yet gloo hands it to its worker
    thread and the caller blocks in wait(). One process runs about seven per step — DDP's
    reduce-scatter of the whole grad buffer (distributed/param_and_grad_buffer.py:51
    dist_reduce_scatter_func) and the param all-gather (:50), finalize_model_grads' token
    count, clip_grads' norm (optimizer/clip_grads.py), the loop's loss reduce and broadcast —
    and on a busy CPU each costs a scheduler round trip. Answer them locally."""
    import torch.distributed as dist
    from megatron.core.distributed import param_and_grad_buffer as pgb

    for name in ("all_reduce", "broadcast"):
        setattr(dist, name, _one_rank(getattr(dist, name), copy=False))
    for name in ("reduce_scatter_tensor", "all_gather_into_tensor"):
        setattr(dist, name, _one_rank(getattr(dist, name), copy=True))
    pgb.dist_reduce_scatter_func = _one_rank(pgb.dist_reduce_scatter_func, copy=True)
    pgb.dist_all_gather_func = _one_rank(pgb.dist_all_gather_func, copy=True)


def apply() -> None:
    """Check the pin and apply the process-wide shims: the TE import guard on every host, the CPU
    shims when CUDA is absent (idempotent). megavlm.parallel.state.Parallel.initialize calls it."""
    global _applied
    check_version()
    install_te_import_guard()
    if _applied or not needed():
        return
    _stub_paged_stash_ops()
    cpu_torch = _CpuTorch()
    for name in CPU_TORCH_MODULES:
        mod = importlib.import_module(name)
        mod.torch = cpu_torch
    _patch_rng_state()
    _skip_single_rank_collectives()
    _quiet_rng_fork_warning()
    _patch_tensor_method_checks()
    _applied = True
