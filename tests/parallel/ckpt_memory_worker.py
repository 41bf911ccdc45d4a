"""One rank of tests/parallel/test_checkpoint_memory.py (run under torchrun, gloo).

Builds a model whose optimizer state dominates (a 32k vocabulary), gives the DistributedOptimizer
a distinct state on every rank, saves a checkpoint and measures this process's host-memory peak
during the save (VmHWM reset through /proc/self/clear_refs), then loads it into a fresh optimizer
and checks the state came back. ``mode``: ``megavlm`` (megavlm.train.checkpoint.save as is) or
``all_ranks`` (megatron's default fully_reshardable exchange: the whole state on every rank)."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megavlm.config import load_config
from megavlm.parallel.state import Parallel
from megavlm.train import checkpoint as ckpt
from megavlm.train.loop import build_model, build_optimizer, wrap_ddp
from megavlm.train.plan import plan_run
from tests import synthetic


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _state(optimizer) -> dict:
    out = {}
    for g_i, group in enumerate(optimizer.optimizer.param_groups):
        for p_i, p in enumerate(group["params"]):
            for k, v in optimizer.optimizer.state[p].items():
                if torch.is_tensor(v) and v.dim() > 0:
                    out[f"{g_i}.{p_i}.{k}"] = v.detach().clone()
    return out


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    raw = synthetic.tiny_run(spec["run_dir"], layers=1)
    raw["model"].update(vocab_size=32768, hidden_size=128, ffn_hidden_size=256)
    run = load_config(raw=raw)
    par = Parallel.initialize(run.parallel, run.seed)

    def fresh():
        chunks, tc = build_model(run, par, torch.float32)
        model = wrap_ddp(chunks, tc)
        opt = build_optimizer(plan_run(run)[run.stages[0].name], model, torch.float32)
        for o in getattr(opt, "chained_optimizers", [opt]):
            o.data_parallel_group_gloo = None  # as built under NCCL: the checkpoint attaches one
        return model, opt

    model, opt = fresh()
    from megavlm.parallel.megatron_compat import prime_optimizer_state

    prime_optimizer_state(opt)
    g = torch.Generator().manual_seed(100 + par.rank)
    for group in opt.optimizer.param_groups:
        for p in group["params"]:
            for k in ("exp_avg", "exp_avg_sq"):
                opt.optimizer.state[p][k].copy_(torch.rand(p.shape, generator=g))
    want = _state(opt)
    full_state = sum(p.numel() for c in model for p in c.parameters()) * 12  # param, m, v in fp32

    if spec["mode"] == "all_ranks":
        ckpt.optimizer_metadata = lambda o: {"distrib_optim_sharding_type": "fully_reshardable"}
    import gc

    gc.collect()
    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    path = Path(spec["run_dir"]) / "ck"
    ckpt.save(path, model, opt, {"stage": "text", "step": 1, "steps": 3}, {}, par.dp_rank,
              write_loader=False)
    peak = (_status_kib("VmHWM") - before) * 1024

    model2, opt2 = fresh()
    ckpt.load(path, model2, opt2)
    got = _state(opt2)
    same = sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    res = {"rank": par.rank, "peak": peak, "full_state": full_state, "restored": same}
    Path(spec["run_dir"], f"rank{par.rank}.json").write_text(json.dumps(res))
    par.destroy()


if __name__ == "__main__":
    main()
