"""megavlm.train.loop.StageTrainer in one process: one metrics line per step with the schedule's
LR, the LR and weight decay set on every optimizer group each step (never decay on norms and
biases, the stage's own weight-decay override), a finished stage skipped, trainable freezing."""

from __future__ import annotations

import json
import math

import pytest
import torch

from megavlm.config import load_config
from megavlm.train import loop
from megavlm.train.plan import plan_run
from tests import synthetic

STEPS = 3


def _run(tmp_path, **stage):
    raw = synthetic.tiny_run(str(tmp_path / "run"), steps=STEPS, layers=2)
    raw["stages"] = raw["stages"][:1]
    raw["stages"][0].update({"checkpoint_fractions": [1.0], **stage})
    run = load_config(raw=raw)
    st = run.stages[0]
    sched = plan_run(run)[st.name]
    return run, st, sched


@pytest.fixture(scope="module")
def trained(parallel1, tmp_path_factory):
    """A 3-step stage with a weight-decay override; per step, every optimizer group's
    (wd_mult, lr, weight_decay) as the optimizer is about to use them."""
    tmp = tmp_path_factory.mktemp("loop")
    run, st, sched = _run(tmp, weight_decay=0.05)
    (tmp / "run").mkdir()
    made = []
    real = loop.build_optimizer

    def capture(*a, **k):
        made.append(real(*a, **k))
        return made[-1]

    groups: dict[int, list] = {}

    def observer(stage, step, model):
        groups[step] = [(g["wd_mult"], g["lr"], g["weight_decay"]) for g in made[-1].param_groups]

    loop.build_optimizer = capture
    try:
        trainer = loop.StageTrainer(run, sched, parallel1, synthetic.factory(run), log=lambda s: None)
        outcome = trainer.train(observer=observer)
    finally:
        loop.build_optimizer = real
    lines = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    return {"run": run, "stage": st, "sched": sched, "outcome": outcome, "lines": lines,
            "groups": groups, "optimizer": made[-1], "dir": tmp}


def test_one_metrics_line_per_step_with_the_schedule_lr(trained):
    run, sched, lines = trained["run"], trained["sched"], trained["lines"]
    assert trained["outcome"].steps == STEPS and not trained["outcome"].skipped
    assert [m["step"] for m in lines] == list(range(1, STEPS + 1))
    tokens = run.train.global_batch_size * run.model.seq_length
    for m in lines:
        assert m["stage"] == "text" and m["tokens"] == tokens and 0 < m["loss_tokens"] <= tokens
        assert m["lr"] == sched.schedule.lr(m["step"] - 1)
        assert math.isfinite(m["loss"]) and m["grad_norm"] > 0 and m["tokens_per_s"] > 0
    assert trained["outcome"].last_loss == lines[-1]["loss"]


def test_lr_and_weight_decay_are_set_on_every_group_each_step(trained):
    sched, groups = trained["sched"], trained["groups"]
    assert sorted(groups) == list(range(1, STEPS + 1))
    lrs = {sched.schedule.lr(s - 1) for s in groups}
    assert len(lrs) == STEPS  # the schedule moves, so a stale LR would show
    for step, gs in groups.items():
        assert {wd_mult for wd_mult, _, _ in gs} == {0.0, 1.0}
        for wd_mult, lr, wd in gs:
            assert lr == sched.schedule.lr(step - 1)
            assert wd == (0.05 if wd_mult else 0.0)  # the stage's override, never on no-decay groups


def test_no_weight_decay_on_norms_and_biases(trained, parallel1):
    opt = trained["optimizer"].chained_optimizers[0]
    names = {}
    for chunk in opt.model_chunks:
        for n, p in chunk.module.named_parameters():
            names[p] = n
    decayed = {names[p]: opt.optimizer.param_groups[gi]["wd_mult"] > 0
               for p, (gi, _) in opt.model_param_group_index_map.items()}
    assert decayed and all(not d for n, d in decayed.items() if "layernorm" in n or n.endswith(".bias")), decayed
    assert all(d for n, d in decayed.items() if n.endswith("linear_qkv.weight") or n.endswith("fc1.weight"))


def test_finished_stage_is_skipped(trained, parallel1):
    before = (trained["dir"] / "run" / "metrics.jsonl").read_text()
    trainer = loop.StageTrainer(trained["run"], trained["sched"], parallel1,
                                synthetic.factory(trained["run"]), log=lambda s: None)
    out = trainer.train()
    assert out.skipped and out.steps == STEPS
    assert (trained["dir"] / "run" / "metrics.jsonl").read_text() == before


def test_set_trainable(parallel1, tmp_path):
    run, _, _ = _run(tmp_path)
    chunks, _ = loop.build_model(run, parallel1, torch.float32)

    def trains(what):
        loop.set_trainable(chunks, what)
        return {n.split(".")[0] == "projector" for c in chunks for n, p in c.named_parameters() if p.requires_grad}

    assert trains("lm") == {False} and trains("projector") == {True} and trains("all") == {False, True}
    with pytest.raises(ValueError, match="'projector\\+lm' is not one of"):
        loop.set_trainable(chunks, "projector+lm")  # the config loader maps the alias, not the trainer
