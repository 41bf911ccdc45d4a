"""A real tiny checkpoint for the evaluation tests, trained once per session by the engine.

The engine trains 3 steps of the text stage of tests/synthetic.py's tiny run (in a torchrun
subprocess, as the parallel tests do) with ``data.tokenizer`` pointing at a small sentencepiece
model whose vocabulary is the model's, so the checkpoint carries its tokenizer like a real one.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.dist import launch
from tests.synthetic import tiny_run

VOCAB = 400
SEQ = 64
WORDS = ("the cat dog bird fish red blue green small large runs jumps sleeps eats near under over "
         "house tree river stone light dark quick slow happy sad old new one two three four five "
         "yes no what is shown in image answer question using single word phrase").split()


def sentences(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(4, 30))
        s = " ".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), k))
        out.append(s[0].upper() + s[1:] + ".")
    return out


def _train_tiny(root: Path, vision: dict | None = None) -> Path:
    from megavlm.data.tokenizer import train_sentencepiece

    data = root / "data"
    data.mkdir()
    txt = data / "train.txt"
    txt.write_text("\n".join(sentences(3000, 1)) + "\nWhat is shown in the image? Yes. No.\n")
    train_sentencepiece([txt], data / "tokenizer.model", vocab_size=VOCAB)
    raw = tiny_run(str(root / "run"), steps=3, layers=2)
    raw["model"].update(vocab_size=VOCAB, seq_length=SEQ)
    if vision:
        raw["model"]["vision"] = vision
    raw["data"] = {"root": str(data), "tokenizer": "tokenizer.model"}
    text = raw["stages"][0]
    text["tokens"] = 3 * 8 * SEQ
    text["checkpoint_fractions"] = [1.0]
    raw["stages"] = [text]
    launch(1, {"config": raw}, root / "work", timeout=240)
    ckpts = sorted((root / "run" / "text" / "checkpoints").glob("step_*"))
    assert ckpts, "the engine wrote no checkpoint"
    return ckpts[-1]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """Vision config of tests/synthetic.py (4 patches of width 24, no encoder record)."""
    return _train_tiny(tmp_path_factory.mktemp("evalrun"))


@pytest.fixture(scope="session")
def encoder_checkpoint(tmp_path_factory) -> Path:
    """A tiny checkpoint whose projector reads the real EfficientNet-Lite0 at 64 px (2 x 2 patches
    of width 1280), letterboxed as the paper's stores are, both recorded in its config: what the paper
    suite and lmms-eval encode images with."""
    return _train_tiny(tmp_path_factory.mktemp("encrun"),
                       {"embed_dim": 1280, "num_patches": 4, "projector_mult": 1, "encoder": "efficientnet-lite0",
                        "resize": "letterbox"})


@pytest.fixture(scope="session")
def loaded(tiny_checkpoint):
    """The checkpoint loaded once for the in-process tests (batch size 4 so batching is exercised)."""
    from megavlm.eval.runner import CheckpointModel

    return CheckpointModel.load(tiny_checkpoint, batch_size=4)
