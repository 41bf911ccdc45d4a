"""The masked cross-entropy Triton kernels compile for the GPUs we train on, without a GPU.

CI has no GPU, so the interpreter tests never exercise Triton's compiler: layout, shared-memory
and dtype errors would first show on a GPU machine. Triton lowers to PTX and runs its bundled
ptxas ahead of time for a named target, so each kernel is compiled here for sm_80 (A100) and
sm_90 (H100) with the default tiling of each dtype, in a private cache so that nothing is reused.
The compiler runs in the ``compiling`` worker (tests/kernels/conftest.py), where Triton was
imported without TRITON_INTERPRET.
"""

from __future__ import annotations

import os

import pytest
import torch

from megavlm_kernels.masked_ce import default_config


def _signatures(dt: str) -> dict[str, dict[str, str]]:
    scalars = dict(n_rows="i32", vocab="i32", dim="i32", stride_h="i32", stride_w="i32")
    consts = dict(BLOCK_N="constexpr", BLOCK_V="constexpr", BLOCK_D="constexpr",
                  PRECISION="constexpr", UPCAST="constexpr")
    return {
        "lse_partials": dict(h_ptr=f"*{dt}", w_ptr=f"*{dt}", tgt_ptr="*i32", max_ptr="*fp32",
                             sumexp_ptr="*fp32", target_ptr="*fp32", **scalars,
                             blocks_per_split="i32", **consts),
        "dlogits": dict(h_ptr=f"*{dt}", w_ptr=f"*{dt}", tgt_ptr="*i32", lse_ptr="*fp32",
                        coef_ptr="*fp32", grad_ptr="*fp32", out_ptr=f"*{dt}", **scalars,
                        stride_out="i32", chunk_start="i32", chunk_width="i32", **consts),
    }


def compile_kernels(arch: int, dt: str, cache_dir: str) -> dict[str, tuple[int, int]]:
    """Worker side: {kernel: (cubin bytes, shared memory bytes)} for one target and dtype."""
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from megavlm_kernels.masked_ce_triton import build_kernels

    kernels = build_kernels(interpret=False)
    tile = default_config(torch.float32 if dt == "fp32" else torch.bfloat16)
    constants = dict(BLOCK_N=tile.block_n, BLOCK_V=tile.block_v, BLOCK_D=tile.block_d,
                     PRECISION="ieee" if dt == "fp32" else "tf32", UPCAST=False)
    out = {}
    for name, signature in _signatures(dt).items():
        compiled = triton.compile(ASTSource(getattr(kernels, name), signature, constants),
                                  target=GPUTarget("cuda", arch, 32),
                                  options=dict(num_warps=tile.num_warps,
                                               num_stages=tile.num_stages))
        out[name] = (len(compiled.asm["cubin"]), compiled.metadata.shared)
    return out


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dt", ["bf16", "fp32"])
def test_kernels_compile_for_cuda(compiling, arch, dt, tmp_path):
    sizes = compiling(compile_kernels, arch, dt, str(tmp_path))
    assert set(sizes) == {"lse_partials", "dlogits"}
    for name, (cubin, shared) in sizes.items():
        assert cubin > 0, f"{name} produced no cubin for sm_{arch}"
        # Shared memory must fit the smaller of the targets (A100: 163 KiB per block).
        assert shared <= 163 * 1024, f"{name} needs {shared} B of shared memory"
