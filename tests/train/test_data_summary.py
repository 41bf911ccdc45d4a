"""The data line each stage prints: examples, tokens and passes of every set it draws from, read
from the stage's plan (megavlm.train.plan: its loader spec's mixture and epochs, its stage's
tokens) and the loader built from it."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from megavlm.config import load_config
from megavlm.train.plan import plan_run
from megavlm.train.stages import data_summary
from tests.synthetic import tiny_run


class Src:
    def __init__(self, lengths):
        self.lengths = np.asarray(lengths)

    def __len__(self):
        return len(self.lengths)


def test_data_summary_counts_examples_tokens_and_passes(tmp_path):
    raw = tiny_run(str(tmp_path / "run"))
    raw["stages"][1].update(name="sft", tokens=5000, mixture={"text": 0.0, "captions": 0.5, "instructions": 0.5})
    raw["stages"].append({**raw["stages"][1], "name": "sft2", "epochs": 2, "batch_unit": "examples",
                          "mixture": {"text": 0.0, "instructions": 1.0}})
    plans = plan_run(load_config(raw=raw), steps={"text": 3, "sft": 3, "sft2": 3})
    loader = SimpleNamespace(sources=[None, Src([10, 15]), Src([100] * 10)])
    assert data_summary(plans["sft"], loader) == ("[data] stage sft: captions 2 examples, 25 tokens, ~100.00 passes; "
                                                  "instructions 10 examples, 1,000 tokens, ~2.50 passes")
    only = SimpleNamespace(sources=[None, None, Src([100] * 10)])
    assert data_summary(plans["sft2"], only) == "[data] stage sft2: instructions 10 examples, 1,000 tokens, 2 epoch(s)"
