"""megavlm.train.guard in the trainer (one process): a NaN injected into one batch's image
embeddings (test-side, by wrapping the loader) stops the run with a message naming stage, step
and quantity and leaves the last good checkpoint as the newest; under ``on_nonfinite=skip`` the
update is dropped (the weights do not move, the schedule does) and logged; a NaN gradient with a
finite loss is caught inside the optimizer step before any update; the spike rule over the
running median."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from megavlm.config import load_config
from megavlm.train import loop
from megavlm.train.guard import LossGuard, TrainingDiverged
from megavlm.train.plan import plan_run
from tests import synthetic

STEPS = 4


def _setup(tmp_path, **train):
    raw = synthetic.tiny_run(str(tmp_path / "run"), steps=STEPS, layers=2)
    raw["stages"] = raw["stages"][:1]
    raw["stages"][0].update(mixture={"text": 0.5, "captions": 0.5}, checkpoint_fractions=[0.5, 1.0])
    raw["train"].update(train)
    run = load_config(raw=raw)
    st = run.stages[0]
    sched = plan_run(run)[st.name]
    (tmp_path / "run").mkdir()
    return run, st, sched


def _poisoning(run, at_step: int):
    """The synthetic loader, with NaN in the image embeddings of step ``at_step``'s batches."""
    make = synthetic.factory(run)

    def factory(spec, parallel, nmb):
        loader = make(spec, parallel, nmb)
        real, calls = loader.next_step, [0]

        def next_step():
            batches = real()
            calls[0] += 1
            if calls[0] == at_step:
                batches = [dataclasses.replace(b, image_embeds=torch.full_like(b.image_embeds, float("nan")))
                           if b.image_embeds is not None else b for b in batches]
            return batches

        loader.next_step = next_step
        return loader

    return factory


def _lines(run):
    p = run.run_dir + "/metrics.jsonl"
    return [json.loads(x) for x in open(p).read().splitlines()]


def _ckpts(run):
    d = loop.ckpt.stage_dir(run.run_dir, "text")
    return sorted(p.name for p in d.iterdir())


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(parallel1, tmp_path):
    run, st, sched = _setup(tmp_path)
    trainer = loop.StageTrainer(run, sched, parallel1, _poisoning(run, 3), log=lambda s: None)
    with pytest.raises(TrainingDiverged) as e:
        trainer.train()
    msg = str(e.value)
    assert "[text] step 3: loss=nan is not finite" in msg and "\n" not in msg, msg
    assert e.value.code == msg  # SystemExit with a message: exit status 1, message on stderr
    assert _ckpts(run) == ["step_0000002"]  # nothing of the bad state, no partial folder
    assert [m["step"] for m in _lines(run)] == [1, 2]


def test_nan_loss_skip_drops_the_update_everywhere_and_logs_it(parallel1, tmp_path):
    run, st, sched = _setup(tmp_path, on_nonfinite="skip")
    weights = {}

    def observer(stage, step, model):  # before the optimizer: the weights the step started from
        weights[step] = [p.detach().clone() for m in model for p in m.parameters()]

    trainer = loop.StageTrainer(run, sched, parallel1, _poisoning(run, 2), log=lambda s: None)
    out = trainer.train(observer=observer)
    assert out.steps == STEPS
    lines = _lines(run)
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    bad = lines[1]
    assert bad["skipped"] is True and bad["skip_reason"].startswith("non-finite loss") and bad["grad_norm"] is None
    assert not any(m.get("skipped") for m in lines[:1] + lines[2:])
    assert all(torch.equal(a, b) for a, b in zip(weights[2], weights[3]))  # the update was dropped
    assert not all(torch.equal(a, b) for a, b in zip(weights[3], weights[4]))  # later ones apply
    assert [m["lr"] for m in lines] == [sched.schedule.lr(i) for i in range(STEPS)]  # a skipped step counts
    assert all(torch.isfinite(p).all() for p in weights[4])


def test_nan_grad_with_finite_loss_is_caught_before_the_update(parallel1, tmp_path):
    run, st, sched = _setup(tmp_path, on_nonfinite="skip")
    weights = {}

    def observer(stage, step, model):
        weights[step] = [p.detach().clone() for m in model for p in m.parameters()]
        if step == 2:  # test-side: poison one gradient buffer after backward
            p = next(p for m in model for p in m.parameters() if p.requires_grad)
            p.main_grad.view(-1)[0] = float("inf")

    loop.StageTrainer(run, sched, parallel1, synthetic.factory(run), log=lambda s: None).train(observer=observer)
    bad = _lines(run)[1]
    assert bad["skipped"] and bad["skip_reason"].startswith("non-finite grad_norm") and bad["loss"] == bad["loss"]
    assert all(torch.equal(a, b) for a, b in zip(weights[2], weights[3]))


def test_nan_grad_stop_names_grad_norm(parallel1, tmp_path):
    run, st, sched = _setup(tmp_path)

    def observer(stage, step, model):
        if step == 3:
            next(p for m in model for p in m.parameters() if p.requires_grad).main_grad.view(-1)[0] = float("nan")

    with pytest.raises(TrainingDiverged, match=r"\[text\] step 3: grad_norm=nan is not finite"):
        loop.StageTrainer(run, sched, parallel1, synthetic.factory(run), log=lambda s: None).train(observer=observer)
    assert _ckpts(run) == ["step_0000002"]


def test_spike_rule_over_the_running_median(parallel1, tmp_path):
    run, _, _ = _setup(tmp_path, spike_factor=2.0, spike_window=3, on_spike="skip")
    g = LossGuard(run.guard, "text")
    for x in (1.0, 3.0):
        assert g.judge_loss(1, x) == (None, None)
        g.accepted(x)
    assert g.judge_loss(3, 100.0) == (None, None)  # the window is not full yet: no judgement
    g.accepted(2.0)
    assert g.judge_loss(4, 4.0) == (None, None)  # 4 = 2 x median 2: not above
    skip, _ = g.judge_loss(5, 4.5)
    assert skip.startswith("loss spike (4.5 > 2.0 x running median 2")
    assert g.state() == [1.0, 3.0, 2.0]  # skipped losses never join the window
    warn = LossGuard(load_config(raw={**_raw(tmp_path), "guard": {"spike_factor": 2.0, "spike_window": 1,
                                                                   "on_spike": "warn"}}).guard,
                     "text", window=[1.0])
    skip, note = warn.judge_loss(7, 3.0)
    assert skip is None and "loss spike 3 > 2.0 x running median 1" in note
    stop = LossGuard(run.guard.__class__(**{**run.guard.__dict__, "on_spike": "stop"}), "text", window=[1.0, 1.0, 1.0])
    with pytest.raises(TrainingDiverged, match=r"\[text\] step 9: loss=5.0 > 2.0 x running median 1.*on_spike=stop"):
        stop.judge_loss(9, 5.0)


def _raw(tmp_path):
    raw = synthetic.tiny_run(str(tmp_path / "r2"), steps=STEPS, layers=2)
    raw["stages"] = raw["stages"][:1]
    return raw


def test_guard_config_is_checked():
    from megavlm.config import ConfigError, GuardConfig, PreemptionConfig

    with pytest.raises(ConfigError, match="spike_factor=0.5 must be > 1"):
        GuardConfig(spike_factor=0.5)
    with pytest.raises(ConfigError, match="'SIGFOO' is not a signal name"):
        PreemptionConfig(stop_signals=["SIGFOO"])
    with pytest.raises(ConfigError, match="max_wall_minutes=0"):
        PreemptionConfig(max_wall_minutes=0)
