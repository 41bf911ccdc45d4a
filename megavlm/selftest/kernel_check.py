"""The fused masked cross-entropy against its reference, on this machine's Triton.

Why a subprocess: Triton fixes compiled-or-interpreted mode when it is first imported, and the
selftest process has usually imported it already (megatron-core does) in compiled mode. So the
check runs in a fresh ``python -m megavlm.selftest.kernel_check`` whose environment is set
before anything imports Triton: ``TRITON_INTERPRET=1`` on a CPU (the kernels then run under
Triton's interpreter at small sizes), cleared on a GPU (compiled kernels at larger sizes). The
worker prints one JSON line with the measured differences; the parent (``compare``) judges them,
so a wrong result is a failure of the selftest, not of the worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch


@dataclass(frozen=True)
class KernelCase:
    """One fused-vs-reference comparison: ``rows`` x ``dim`` hidden states, ``vocab`` outputs."""

    rows: int
    dim: int
    vocab: int
    keep: float
    dtype: str
    z_loss: float
    seed: int
    small_tiles: bool
    """16-wide tiles (interpreter sizes: several blocks and backward chunks still run)."""


def cases(device: str, size: str) -> list[KernelCase]:
    if size == "small":  # odd sizes: partial row, vocabulary and hidden-dimension blocks
        return [KernelCase(37, 40, 101, 0.3, "float32", 1e-2, 1, True),
                KernelCase(45, 32, 77, 0.29, "bfloat16", 1e-4, 2, True)]
    return [KernelCase(4096, 256, 5003, 0.29, "bfloat16", 1e-4, 11, False),
            KernelCase(4096, 256, 5003, 0.29, "float32", 1e-4, 12, False),
            KernelCase(8 * 1024, 2048, 50432, 0.288, "bfloat16", 1e-4, 13, False)]


# Tolerances (relative to the largest reference entry for gradients): fp32 is the same math up
# to summation order; 16-bit logits are rounded by the reference but not by the fused kernel.
TOLERANCE = {"float32": dict(loss=1e-5, grad=1e-4), "bfloat16": dict(loss=2e-3, grad=3e-2)}


def _run_case(case: KernelCase, device: str) -> dict[str, Any]:
    from megavlm.kernels.masked_ce import TileConfig, masked_linear_cross_entropy
    from megavlm.ops.masked_ce import masked_cross_entropy_reference

    dtype = getattr(torch, case.dtype)
    g = torch.Generator().manual_seed(case.seed)
    hidden = torch.randn(case.rows, case.dim, generator=g).to(device=device, dtype=dtype)
    weight = (torch.randn(case.vocab, case.dim, generator=g) / case.dim ** 0.5 * 3).to(
        device=device, dtype=dtype)
    labels = torch.randint(0, case.vocab, (case.rows,), generator=g).to(device)
    mask = (torch.rand(case.rows, generator=g) < case.keep).to(device)
    config = (TileConfig(block_n=16, block_v=16, block_d=16, chunk_bytes=16 * 48 * 4)
              if case.small_tiles else None)

    def run(fn, h, w, **kw):
        h = h.detach().clone().requires_grad_()
        w = w.detach().clone().requires_grad_()
        loss, count = fn(h, w, labels, mask, z_loss=case.z_loss, **kw)
        loss.backward()
        return loss.detach().double(), int(count), h.grad.double(), w.grad.double()

    loss, count, gh, gw = run(masked_linear_cross_entropy, hidden, weight, config=config)
    # The spec in fp32 on the same (rounded) inputs.
    r_loss, r_count, r_gh, r_gw = run(masked_cross_entropy_reference, hidden.float(),
                                      weight.float())

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))

    return dict(case=asdict(case), count=count, ref_count=r_count, loss=float(loss),
                ref_loss=float(r_loss),
                loss_rel=float((loss - r_loss).abs() / r_loss.abs().clamp_min(1e-12)),
                grad_hidden_rel=rel(gh, r_gh), grad_weight_rel=rel(gw, r_gw),
                finite=bool(torch.isfinite(gh).all() and torch.isfinite(gw).all()),
                masked_rows_zero=bool((gh[~mask.cpu().to(gh.device)] == 0).all()))


def compare(result: dict[str, Any]) -> list[str]:
    """Problems of one worker result (empty: the fused kernel agrees with the reference)."""
    case = result["case"]
    tol = TOLERANCE[case["dtype"]]
    name = f"{case['rows']}x{case['dim']}x{case['vocab']} {case['dtype']}"
    problems = []
    if result["count"] != result["ref_count"]:
        problems.append(f"{name}: count {result['count']} != {result['ref_count']}")
    if not result["finite"]:
        problems.append(f"{name}: non-finite gradients")
    if not result["masked_rows_zero"]:
        problems.append(f"{name}: masked rows received gradient")
    if not result["loss_rel"] <= tol["loss"]:
        problems.append(f"{name}: loss {result['loss']:.6g} vs reference {result['ref_loss']:.6g}"
                        f" (relative {result['loss_rel']:.2e} > {tol['loss']:.0e})")
    for key in ("grad_hidden_rel", "grad_weight_rel"):
        if not result[key] <= tol["grad"]:
            problems.append(f"{name}: {key} {result[key]:.2e} > {tol['grad']:.0e}")
    return problems


def run_worker(device: str, size: str, timeout: float = 300) -> tuple[list[dict], Optional[str]]:
    """Run the cases in a fresh process; (results, error text when the worker itself failed)."""
    import megavlm

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    root = str(Path(megavlm.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    out = subprocess.run([sys.executable, "-m", "megavlm.selftest.kernel_check", device, size],
                         env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if out.returncode != 0:
        return [], f"kernel check worker failed (exit {out.returncode}):\n{out.stderr[-3000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1]), None


def main(argv: list[str]) -> int:
    device, size = argv
    print(json.dumps([_run_case(c, device) for c in cases(device, size)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
