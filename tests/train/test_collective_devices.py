"""Every collective the training loop issues gets its tensors on ``parallel.device``.

Why: on CUDA the process groups are NCCL only, and NCCL rejects a CPU tensor — a host-side
bookkeeping tensor handed to ``dist.all_reduce`` kills every GPU run after its first step. On
this CPU-only machine ``parallel.device`` *is* the CPU, so comparing devices alone could never
fail. The test therefore simulates the GPU split between host and device memory: a torch
function mode tags every tensor that would live on the host when the run's device is a GPU —

* made by a factory (``torch.zeros``, ``torch.tensor``, …) without a ``device=``,
* moved with ``.cpu()``, made by ``torch.from_numpy``,
* moved by megavlm code to a CPU device other than the run's own ``parallel.device`` object,
* computed from such a tensor (a 0-dim host tensor mixed into a device op does not spread the
  tag: torch accepts CPU scalars beside CUDA tensors) —

and wrapped ``torch.distributed`` collectives record, per tensor argument, the caller, the
tensor's device and its host tag. A real one-process training stage (megatron DDP, distributed
optimizer, forward-backward, checkpoint) runs under both. The test fails when a collective
receives a host-tagged tensor or a tensor on another device than ``parallel.device`` and either
the collective is called from megavlm code or megavlm code made the tensor. What megatron does
with its own tensors is megatron's business (listed in docs/gpu-audit.md).

Limit: a factory given an explicit ``device=`` counts as placed, so ``torch.zeros(..., device="cpu")``
in megavlm code would pass here; docs/gpu-audit.md covers those by reading.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from tests import synthetic

PKG = str(Path(__file__).resolve().parents[2] / "megavlm") + "/"
HERE = str(Path(__file__).resolve())

_FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.tensor, torch.as_tensor,
              torch.arange, torch.rand, torch.randn, torch.randint, torch.linspace, torch.eye,
              torch.empty_strided, torch.scalar_tensor}
_INPLACE_DUNDERS = {f"__i{op}__" for op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow",
                                              "and", "or", "xor", "lshift", "rshift", "matmul")} | {"__setitem__"}
_COLLECTIVES = ("all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor",
                "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single",
                "send", "recv", "isend", "irecv", "scatter", "gather")


def _call_site(skip_torch: bool) -> str:
    """file:line of the first frame outside this file (and outside torch when ``skip_torch``)."""
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if name != HERE and "torch/overrides.py" not in name and not (skip_torch and "/torch/" in name):
            return f"{name}:{f.f_lineno}"
        f = f.f_back
    return "?"


class HostTags(TorchFunctionMode):
    """Tags tensors that would sit in host memory on a GPU run (``t._host_origin = file:line``)."""

    def __init__(self, run_device: torch.device):
        super().__init__()
        self.run_device = run_device

    def _tag(self, out, origin: str):
        for t in _tensors(out):
            t._host_origin = origin

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _FACTORIES:
            if "device" not in kwargs:
                self._tag(out, _call_site(skip_torch=True))
            return out
        if func is torch.from_numpy:
            self._tag(out, _call_site(skip_torch=True))
            return out
        if func is torch.Tensor.cpu:  # a copy on a GPU run, even where the CPU returns the tensor itself
            out = out.clone() if out is args[0] else out
            self._tag(out, _call_site(skip_torch=True))
            return out
        if func is torch.Tensor.to or func is torch.Tensor.cuda:
            dev = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (str, torch.device))), None))
            if dev is not None:
                site = _call_site(skip_torch=False)  # the direct caller: Module.to stays torch's
                host = (dev is not self.run_device and torch.device(dev).type == "cpu"
                        and site.startswith(PKG))
                if host != hasattr(args[0], "_host_origin") and out is args[0]:
                    out = out.clone()  # crossing host <-> device is a copy on a GPU run
                if host:
                    self._tag(out, site)
                elif hasattr(out, "_host_origin"):
                    del out._host_origin
                return out
        name = getattr(func, "__name__", "")
        dunder = name.startswith("__") and name.endswith("__")
        inplace = (name.endswith("_") and not dunder) or name in _INPLACE_DUNDERS
        if inplace:  # the result lives where ``self`` lives
            return out
        origins = [t._host_origin for t in _tensors((args, kwargs))
                   if t.dim() > 0 and hasattr(t, "_host_origin")]
        if origins:
            for t in _tensors(out):
                if not hasattr(t, "_host_origin"):
                    t._host_origin = origins[0]
        return out


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


@dataclass
class Seen:
    op: str
    caller: str
    device: torch.device
    host_origin: str | None

    def megavlm(self) -> bool:
        return self.caller.startswith(PKG) or (self.host_origin or "").startswith(PKG)


def record_collectives(monkeypatch, seen: list[Seen]) -> None:
    for name in _COLLECTIVES:
        real = getattr(dist, name)

        def wrapper(*args, _real=real, _name=name, **kwargs):
            caller = _call_site(skip_torch=True)
            for t in _tensors((args, kwargs)):
                seen.append(Seen(_name, caller, t.device, getattr(t, "_host_origin", None)))
            return _real(*args, **kwargs)

        monkeypatch.setattr(dist, name, wrapper)


def wrong(seen: list[Seen], device: torch.device) -> list[Seen]:
    return [s for s in seen if s.megavlm() and (s.host_origin is not None or s.device != device)]


def _train(parallel, tmp_path, monkeypatch, seen):
    from megavlm.config import load_config
    from megavlm.train.stages import run_stages

    raw = synthetic.tiny_run(str(tmp_path / "run"), steps=2, layers=2)
    raw["stages"] = raw["stages"][:1]
    run = load_config(raw=raw)
    record_collectives(monkeypatch, seen)
    with HostTags(parallel.device):
        out = run_stages(run, parallel, loader_factory=synthetic.factory(run), log=lambda s: None)
    return out


def test_training_collectives_use_the_run_device(parallel1, tmp_path, monkeypatch):
    seen: list[Seen] = []
    (outcome,) = _train(parallel1, tmp_path, monkeypatch, seen)
    assert outcome.steps == 2 and outcome.last_loss is not None
    ours = [s for s in seen if s.caller.startswith(PKG)]
    assert {s.op for s in ours} >= {"all_reduce", "broadcast"}, ours  # the loop's loss reduction ran
    bad = wrong(seen, parallel1.device)
    assert not bad, "collectives given host tensors by megavlm:\n" + "\n".join(
        f"  {s.op} from {s.caller}: tensor on {s.device}, host tensor made at {s.host_origin}" for s in bad)


def test_host_tags_follow_the_gpu_rules(parallel1):
    """The harness itself: what would be host memory on a GPU run is tagged, what is placed on
    the run's device is not (so the test above can fail)."""
    dev = parallel1.device
    with HostTags(dev):
        host = torch.zeros(3, dtype=torch.float64)
        placed = torch.zeros(3, dtype=torch.float64, device=dev)
        moved = host.to(dev, torch.float64)
        derived = host[:2] * 2
        back = placed.cpu()
        placed.add_(torch.tensor(1.0))  # a host scalar mixed in: allowed on CUDA too
    assert hasattr(host, "_host_origin") and hasattr(derived, "_host_origin") and hasattr(back, "_host_origin")
    assert not hasattr(placed, "_host_origin") and not hasattr(moved, "_host_origin")
