"""A DistributedOptimizer with torch's Adam (no apex / TE on this host) saved after a step and
loaded into a fresh one continues exactly: the megatron_compat optimizer-state shims
(prime_optimizer_state, adam_step_is_not_a_shard, unshare_adam_steps) make the load work and
keep each parameter's Adam step its own; the save spawns no helper process
(in_process_write_queue)."""

from __future__ import annotations

import multiprocessing

import torch

from megavlm.config import load_config
from megavlm.model.build import build_model
from megavlm.train import checkpoint as ckpt
from megavlm.train.loop import build_optimizer, wrap_ddp
from megavlm.train.plan import plan_run
from tests import synthetic


def _build(run, parallel):
    chunks, tc = build_model(run, parallel, torch.float32, backend="local")
    model = wrap_ddp(chunks, tc)
    return model, build_optimizer(plan_run(run)[run.stages[0].name], model, torch.float32)


def _step(model, optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model:
        m.zero_grad_buffer()
        for p in m.module.parameters():
            p.main_grad.copy_(torch.randn(p.shape, generator=g) * 1e-2)
    for group in optimizer.param_groups:
        group["lr"] = 1e-2
    ok, _, _ = optimizer.step()
    assert ok


def _weights(model) -> dict:
    return {n: p.detach().clone() for m in model for n, p in m.module.named_parameters()}


def _adam_states(optimizer) -> list[dict]:
    return [s for o in getattr(optimizer, "chained_optimizers", [optimizer])
            for s in o.optimizer.state.values()]


def test_resume_continues_adam_exactly(parallel1, tmp_path):
    run = load_config(raw=synthetic.tiny_run(str(tmp_path / "run"), layers=2))
    model, opt = _build(run, parallel1)
    _step(model, opt, 0)
    _step(model, opt, 1)
    before = set(multiprocessing.active_children())
    path = tmp_path / "step_0000002"
    ckpt.save(path, model, opt, {"stage": "text", "step": 2, "steps": 4}, {}, 0, write_loader=False)
    assert set(multiprocessing.active_children()) == before  # no Manager server left behind

    model2, opt2 = _build(run, parallel1)
    ckpt.load(path, model2, opt2)
    states = _adam_states(opt2)
    assert states and all(float(s["step"]) == 2 for s in states)
    assert len({id(s["step"]) for s in states}) == len(states)  # each parameter its own step
    for a, b in zip(_adam_states(opt), states):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    w1, w2 = _weights(model), _weights(model2)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)

    _step(model, opt, 2)  # the same third step on both: a shared or wrong step count would differ
    _step(model2, opt2, 2)
    w1, w2 = _weights(model), _weights(model2)
    assert all(torch.equal(w1[k], w2[k]) for k in w1), [k for k in w1 if not torch.equal(w1[k], w2[k])]
