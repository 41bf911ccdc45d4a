"""The masked cross-entropy Triton kernels compile for the GPUs we train on, without a GPU, as the
kernel that a real launch on the recipe's shapes would run.

CI has no GPU, so the interpreter tests never exercise Triton's compiler: layout, shared-memory
and dtype errors would first show on a GPU machine. Triton lowers to PTX and runs its bundled
ptxas ahead of time for a named target, so each kernel is compiled here for sm_80 (A100) and
sm_90 (H100) in a private cache so that nothing is reused.

Why the specialisation matters: a launch specialises its arguments — an integer divisible by 16
and a pointer aligned to 16 bytes get ``tt.divisibility = 16``, an integer equal to 1 becomes a
constant — and only with those facts can the compiler vectorise loads and pipeline the K loop
with asynchronous copies. A compile from a bare signature checks a different, unpipelined kernel.
So the arguments here go through Triton's own launch binder (``create_function_from_signature``
and ``JITFunction._pack_args``, what ``JITFunction.run`` calls before compiling) with the
arguments ``megavlm.kernels.masked_ce`` passes on the DCLM-1.4B shapes (d = 2048,
V = 50432, bf16, 8 x 2048 text rows or the loss rows of 71 %-masked caption rows, an H100's 132
multiprocessors): device pointers stand in as objects with ``data_ptr`` and ``dtype``, fresh
allocations at 0 (the caching allocator aligns to 512 bytes) and views at their byte offsets.
The compiler runs in the ``compiling`` worker (tests/kernels/conftest.py), where Triton was
imported without TRITON_INTERPRET.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import pytest
import torch

from megavlm.kernels.masked_ce import backward_chunk, default_config, forward_grid

H100_SMS = 132
DIM, VOCAB = 2048, 50432  # launch/configs/dclm-1b.yaml at TP1


@dataclass(frozen=True)
class DevicePointer:
    """Stands in for a CUDA tensor in Triton's binder: it reads only ``data_ptr()`` and ``dtype``."""

    address: int
    dtype: torch.dtype

    def data_ptr(self) -> int:
        return self.address


def launch_arguments(kernel: str, n: int, dtype: torch.dtype) -> list:
    """Positional arguments of ``kernel`` as ``megavlm.kernels.masked_ce`` launches it on ``n``
    gathered rows (``_row_lse`` for the forward, the first chunk of ``backward`` for dlogits)."""
    cfg = default_config(dtype)
    fresh = lambda dt: DevicePointer(0, dt)  # noqa: E731
    if kernel == "lse_partials":
        _, splits, per_split = forward_grid(cfg, n, VOCAB, H100_SMS)
        part = splits * n * 4  # part[0], part[1], part[2] of one (3, splits, n) fp32 tensor
        return [fresh(dtype), fresh(dtype), fresh(torch.int32), DevicePointer(0, torch.float32),
                DevicePointer(part, torch.float32), DevicePointer(2 * part, torch.float32),
                n, VOCAB, DIM, DIM, DIM, per_split]
    chunk = backward_chunk(cfg, n, VOCAB, torch.tensor([], dtype=dtype).element_size())
    return [fresh(dtype), fresh(dtype), fresh(torch.int32), fresh(torch.float32),
            fresh(torch.float32), fresh(torch.float32), fresh(dtype),
            n, VOCAB, DIM, DIM, DIM, chunk, 0, min(chunk, VOCAB)]


def compile_as_launched(kernel: str, arch: int, n: int, dt: str, cache_dir: str,
                        specialise: bool = True) -> dict:
    """Worker side: compile one kernel for sm_``arch`` with the launch's specialisation (or, with
    ``specialise=False``, from the bare signature: the old check) and describe the result."""
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    from megavlm.kernels.masked_ce import _launch_options
    from megavlm.kernels.masked_ce_triton import build_kernels

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dt]
    fn = getattr(build_kernels(interpret=False), kernel)
    options = _launch_options(default_config(dtype),
                              torch.empty(0, dtype=dtype, device="meta"))
    options["UPCAST"] = False  # set only for bf16 on the CPU interpreter
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, parsed = binder(*launch_arguments(kernel, n, dtype), **options)
    parsed_options, signature, constexprs, attrs = fn._pack_args(backend, options, bound,
                                                                 specialization, parsed)
    if not specialise:
        attrs = {}
        signature = {k: ("i32" if v == "constexpr" and k not in constexpr_names(fn) else v)
                     for k, v in signature.items()}
        constexprs = {k: v for k, v in constexprs.items()
                      if fn.arg_names[k[0]] in constexpr_names(fn)}
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                              options=parsed_options.__dict__)
    ttgir = compiled.asm["ttgir"]
    divisible = {fn.arg_names[k[0]] for k, v in attrs.items() if ["tt.divisibility", 16] in v}
    return dict(cubin=len(compiled.asm["cubin"]), shared=compiled.metadata.shared,
                divisible=sorted(divisible),
                constants=sorted(fn.arg_names[k[0]] for k in constexprs),
                ttgir_divisibility=len(re.findall(r"tt\.divisibility = 16", ttgir)),
                async_copies=len(re.findall(r"ttg\.async_copy_global_to_local", ttgir)),
                async_waits=len(re.findall(r"ttg\.async_wait", ttgir)),
                wgmma=len(re.findall(r"ttng\.warp_group_dot", ttgir)))


def constexpr_names(fn) -> set[str]:
    return {p.name for p in fn.params if p.is_constexpr}


def expected_divisible(kernel: str, n: int, dtype: torch.dtype) -> set[str]:
    """The rule a launch applies, stated independently of Triton's code: 16-byte-aligned pointers
    and integers divisible by 16 (an integer equal to 1 would become a constant instead)."""
    from megavlm.kernels.masked_ce_triton import _dlogits, _lse_partials

    names = (_lse_partials if kernel == "lse_partials" else _dlogits).__code__.co_varnames
    out = set()
    for name, arg in zip(names, launch_arguments(kernel, n, dtype)):
        value = arg.data_ptr() if isinstance(arg, DevicePointer) else arg
        if value % 16 == 0 and (isinstance(arg, DevicePointer) or value != 1):
            out.add(name)
    return out


TEXT_ROWS = 8 * 2048  # a text micro-batch of the recipe: every position carries loss
CAPTION_ROWS = 8 * (1024 - 729)  # the benchmark's caption batch: 71 % masked, 2360 loss rows
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes of shared memory per block


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dt", ["bf16", "fp32"])
@pytest.mark.parametrize("kernel", ["lse_partials", "dlogits"])
def test_kernels_compile_as_launched_on_text_rows(compiling, kernel, arch, dt, tmp_path):
    got = compiling(compile_as_launched, kernel, arch, TEXT_ROWS, dt, str(tmp_path))
    dtype = torch.bfloat16 if dt == "bf16" else torch.float32
    assert got["cubin"] > 0, f"{kernel} produced no cubin for sm_{arch}"
    assert got["shared"] <= SHARED_LIMIT[arch], f"{kernel} needs {got['shared']} B of shared"
    assert set(got["divisible"]) == expected_divisible(kernel, TEXT_ROWS, dtype)
    assert {"h_ptr", "w_ptr", "dim", "stride_h", "stride_w", "n_rows"} <= set(got["divisible"])
    assert got["ttgir_divisibility"] >= len(got["divisible"])
    # The K loop is software-pipelined: asynchronous global->shared copies of both operands for
    # each of the num_stages buffers, waited on inside the loop.
    stages = default_config(dtype).num_stages
    assert got["async_copies"] >= 2 * stages and got["async_waits"] >= 1, got
    if arch == 90 and dt == "bf16":
        assert got["wgmma"] > 0, "bf16 tl.dot should lower to Hopper warp-group MMA"


@pytest.mark.parametrize("kernel", ["lse_partials", "dlogits"])
def test_caption_rows_not_divisible_by_16_still_pipeline(compiling, kernel, tmp_path):
    got = compiling(compile_as_launched, kernel, 90, CAPTION_ROWS, "bf16", str(tmp_path))
    assert CAPTION_ROWS % 16 and "n_rows" not in got["divisible"]
    assert set(got["divisible"]) == expected_divisible(kernel, CAPTION_ROWS, torch.bfloat16)
    assert got["async_copies"] >= 2 * default_config(torch.bfloat16).num_stages


def test_bare_signature_compiles_a_different_kernel(compiling, tmp_path):
    """The old check (no specialisation) gives a kernel without divisibility facts and without
    the asynchronous copies: this is why the test above goes through the launch binder."""
    got = compiling(compile_as_launched, "lse_partials", 90, TEXT_ROWS, "bf16", str(tmp_path),
                    specialise=False)
    assert got["divisible"] == [] and got["ttgir_divisibility"] == 0
    assert got["async_copies"] == 0
