"""The data line each stage prints: examples, tokens and passes of every set it draws from."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from megavlm.config import MixtureConfig, StageConfig
from megavlm.train.stages import data_summary


def test_data_summary_counts_examples_tokens_and_passes():
    st = StageConfig(name="sft", tokens=5000, mixture=MixtureConfig(text=0.0, captions=0.5, instructions=0.5))
    class Src:
        def __init__(self, lengths):
            self.lengths = np.asarray(lengths)

        def __len__(self):
            return len(self.lengths)

    loader = SimpleNamespace(sources=[None, Src([10, 15]), Src([100] * 10)])
    line = data_summary(st, loader)
    assert line == ("[data] stage sft: captions 2 examples, 25 tokens, ~100.00 passes; "
                    "instructions 10 examples, 1,000 tokens, ~2.50 passes")
