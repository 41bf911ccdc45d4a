"""Stage budgets decided before training: real (non-padding) tokens walked over the data plan,
epochs in examples, and the errors for data that cannot meet them."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from megavlm.config import load_config
from megavlm.data.mixture import MixturePlanner, steps_for_real_tokens
from megavlm.train.budget import BudgetError, stage_budget
from megavlm.train.plan import loader_spec, plan_run, sizing_loader
from megavlm.train.plan import describe_run


def _run(root, stages, batch=4, seq=64):
    return load_config(raw={"model": {"seq_length": seq, "vision": {"embed_dim": 8, "num_patches": 4}},
                            "train": {"micro_batch_size": 1, "global_batch_size": batch},
                            "data": {"root": str(root), "instructions": ["instructions"]},
                            "stages": stages})


def test_real_token_walk_is_exact_and_deterministic():
    rng = np.random.default_rng(0)
    lengths = [None, rng.integers(10, 60, 50), None]  # captions only: rows end in padding
    mk = lambda: MixturePlanner(lengths, [0, 1, 0], seq_length=64, seed=1, stage="s")  # noqa: E731
    r = steps_for_real_tokens(mk(), 5000, rows_per_step=4)
    # replay the same plan by hand: real tokens per step until the budget is met
    p, real, steps = mk(), 0, 0
    while real < 5000:
        real += sum(n for _ in range(4) for *_, n in p.plan_row())
        steps += 1
    assert (r.steps, r.real_tokens, r.rows) == (steps, real, 4 * steps) and not r.extrapolated
    assert r.padding_fraction == pytest.approx(1 - real / (4 * steps * 64))
    assert r.padding_fraction > 0.05 and r.steps > math.ceil(5000 / (4 * 64))  # padding costs steps
    assert steps_for_real_tokens(mk(), 5000, 4) == r  # a pure function of (seed, stage, lengths)
    e = steps_for_real_tokens(mk(), 50_000, 4, max_rows=100)
    assert e.extrapolated and e.rows == 100 and abs(e.steps - steps_for_real_tokens(mk(), 50_000, 4).steps) <= 3


def test_plan_counts_real_tokens_on_the_data(corpus):
    stages = [{"name": "img", "tokens": 20_000, "budget": "real", "mixture": {"text": 0.5, "captions": 0.5}},
              {"name": "pos", "tokens": 20_000, "mixture": {"text": 0.5, "captions": 0.5}}]
    p = describe_run(_run(corpus, stages))
    real, pos = p["stages"]
    assert pos["steps"] == math.ceil(20_000 / 256) and pos["budget"] == "positions"
    assert real["budget"] == "real" and real["estimated"] is False
    assert real["real_tokens"] >= 20_000 and real["real_tokens"] - 20_000 < 256
    assert real["steps"] == math.ceil(20_000 / (256 * (1 - real["padding_fraction"]))) or \
        abs(real["steps"] - 20_000 / (256 * (1 - real["padding_fraction"]))) < 1.5


def test_epochs_in_examples(corpus):
    stages = [{"name": "sft", "tokens": 0, "epochs": 3, "batch_unit": "examples",
               "mixture": {"text": 0.0, "instructions": 1.0}}]
    run = _run(corpus, stages, batch=8)
    b = plan_run(run)["sft"].budget
    assert b.examples == 80 and b.steps == math.ceil(3 * 80 / 8) and not b.estimated  # the corpus has 80
    # one example per row: 8 rows per step hold 8 conversations
    loader, _ = sizing_loader(loader_spec(run, run.stage("sft")))
    rows = [loader.planner.plan_row() for _ in range(16)]
    assert all(len(r) == 1 for r in rows)
    # without the data: the stated epoch_examples, marked estimated
    absent = _run(corpus / "nowhere", [{**stages[0], "epoch_examples": 665000}], batch=256)
    b = plan_run(absent)["sft"].budget
    assert b.estimated and b.steps == math.ceil(3 * 665000 / 256) == 7793


def test_epochs_of_an_empty_dataset_is_an_error(corpus, tmp_path):
    class Empty:
        num_examples = 0
        tokens_per_epoch = 0

    run = _run(corpus, [{"name": "sft", "tokens": 0, "epochs": 2, "batch_unit": "examples",
                         "mixture": {"text": 0.0, "instructions": 1.0}}])
    with pytest.raises(BudgetError, match="sft is sized as epochs=2 of examples but its instruction data"):
        stage_budget(run, run.stage("sft"), run.stage_seq_length(run.stage("sft")), Empty())
    run = _run(corpus, [{"name": "sft", "tokens": 0, "epochs": 2, "mixture": {"text": 0.0, "instructions": 1.0}}])
    with pytest.raises(BudgetError, match="one pass over its data is empty"):
        stage_budget(run, run.stage("sft"), run.stage_seq_length(run.stage("sft")), Empty())
    with pytest.raises(Exception, match="batch_unit=examples sizes the stage in epochs"):
        _run(corpus, [{"name": "sft", "tokens": 10, "batch_unit": "examples"}])


def test_sft_budget_is_the_same_in_training(corpus):
    """run_stages sizes stages through the same plan as `megavlm plan`; sizing with the training
    loader of a data-parallel rank (a sizer, as test loaders do) gives the same steps."""
    from megavlm.train.plan import plan_run
    from megavlm.train.stages import default_loader_factory

    run = _run(corpus, [{"name": "img", "tokens": 20_000, "budget": "real",
                         "mixture": {"text": 0.5, "captions": 0.5}}])
    parallel = type("P", (), {"dp_rank": 1, "dp": 2})()
    make = default_loader_factory(run)
    ranked = plan_run(run, sizer=lambda st, spec: make(spec, parallel, 2))["img"]
    assert ranked.budget.method == "real" and not ranked.budget.estimated
    assert ranked.steps == describe_run(run)["stages"][0]["steps"]


@pytest.mark.parametrize("fractions", [[0, 1, 0], [0, 0.5, 0.5], [0.3, 0.7, 0]])
def test_best_fit_window_cuts_padding_keeps_ratios_and_resumes(fractions):
    rng = np.random.default_rng(3)
    lengths = [rng.integers(1, 300, 200), rng.integers(20, 200, 300), rng.integers(10, 250, 300)]
    S = 256

    def walk(window, rows=1200, p=None):
        p = p or MixturePlanner(lengths, fractions, seq_length=S, seed=5, stage="s", window=window)
        out = [p.plan_row() for _ in range(rows)]
        return p, out

    def stats(plans):
        c = np.zeros(3)
        for r in plans:
            for k, _, _, n in r:
                c[k] += n
        return c

    _, in_order = walk(1)
    p8, best = walk(8)
    pad1 = 1 - stats(in_order).sum() / (len(in_order) * S)
    pad8 = 1 - stats(best).sum() / (len(best) * S)
    assert pad8 < pad1 * 0.7, (pad1, pad8)  # padding drops
    c = stats(best)
    assert np.abs(c / c.sum() - np.array(fractions)).max() <= 0.005  # the ratio guarantee holds
    # each head sample once per epoch: the first len(source) picks of a source are a permutation
    for k in (1, 2):
        if fractions[k] > 0:
            picks = [i for r in best for kk, i, _, _ in r if kk == k][:len(lengths[k])]
            assert len(set(picks)) == len(picks)
    # resume from the state after 500 rows reproduces the rest
    q, first = walk(8, rows=500)
    state = json.loads(json.dumps(q.state_dict()))
    r = MixturePlanner(lengths, fractions, seq_length=S, seed=5, stage="s", window=8)
    r.load_state_dict(state)
    assert [r.plan_row() for _ in range(700)] == best[500:]
