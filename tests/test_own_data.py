"""The walk-through of docs/own-data.md, run with its own commands on a small generated image
folder: tokenizer -> text set -> encode (real EfficientNet-Lite0, 64 px) -> conversations ->
recipe -> `megavlm train --check` -> `megavlm train` -> `megavlm eval vision --task generic` on
own questions, which must score above the majority class. The images are two visually distinct
classes (red / blue squares with noise), a task the tiny model learns in a few dozen steps."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.data.conftest import synthetic_text

REPO = Path(__file__).resolve().parents[1]
COLOURS = {"red": (210, 40, 40), "blue": (40, 40, 210)}


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def _images(folder: Path, n: int, seed: int, captions: bool) -> list[tuple[str, str]]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    out = []
    for k in range(n):
        label = list(COLOURS)[k % 2]
        arr = np.clip(np.array(COLOURS[label]) + rng.integers(-30, 30, (48, 48, 3)), 0, 255).astype(np.uint8)
        name = f"{label}-{seed}-{k:03d}.png"
        Image.fromarray(arr).save(folder / name)
        if captions:
            (folder / name).with_suffix(".txt").write_text(f"A {label} square.\n")
        out.append((name, label))
    return out


def _prepare(tmp_path: Path, steps: int) -> tuple[Path, Path]:
    """Steps 1-4 of docs/own-data.md with its commands; returns (data root, recipe)."""
    pytest.importorskip("efficientnet_lite_pytorch")
    d = tmp_path / "mydata"
    raw = d / "raw"
    train = _images(raw / "images", 24, seed=1, captions=True)
    test = _images(raw / "test_images", 10, seed=2, captions=False)
    docs = synthetic_text(1500, seed=3, max_words=40) + [f"A {c} square. What colour? {c}" for c in COLOURS] * 50
    (raw / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    convs = [{"id": f"c{i}", "image": name, "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": label}]}
        for i, (name, label) in enumerate(train)]
    (raw / "conversations.jsonl").write_text("".join(json.dumps(c) + "\n" for c in convs))
    (d / "questions.jsonl").write_text("".join(json.dumps(
        {"question_id": f"t{i}", "image": name, "question": "What colour?", "answers": [label]}) + "\n"
        for i, (name, label) in enumerate(test)))

    tok = str(d / "tokenizer.model")
    assert _tool("train_tokenizer")(["--input", str(raw / "text.jsonl"), "--output", tok, "--vocab-size", "400"]) == 0
    assert _tool("preprocess_text")(["--input", str(raw / "text.jsonl"), "--tokenizer", tok,
                                     "--output", str(d / "text"), "--no-progress"]) == 0
    enc = _tool("encode_images")
    assert enc(["--input", str(raw / "images"), "--output", str(d / "captions"), "--tokenizer", tok,
                "--image-size", "64", "--decoder", "pil", "--no-progress", "--threads", "2"]) == 0
    assert enc(["--input", str(raw / "test_images"), "--output", str(d / "test"), "--no-captions",
                "--image-size", "64", "--decoder", "pil", "--no-progress", "--threads", "2"]) == 0
    assert _tool("preprocess_conversations")(["--input", str(raw / "conversations.jsonl"), "--tokenizer", tok,
                                              "--embeds", str(d / "captions"),  # the encode's --output
                                              "--output", str(d / "instructions")]) == 0
    recipe = {
        "run_dir": str(tmp_path / "runs" / "mine"), "seed": 3,
        "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "ffn_hidden_size": 128,
                  "vocab_size": 512, "seq_length": 32,
                  "vision": {"embed_dim": 1280, "num_patches": 4, "projector_mult": 1, "encoder": "efficientnet-lite0"}},
        "train": {"micro_batch_size": 8, "global_batch_size": 8, "precision": "fp32", "log_every": 100},
        "data": {"root": str(d), "build": "none", "tokenizer": "tokenizer.model", "text": ["text"],
                 "captions": ["captions"], "instructions": ["instructions"], "prompt_template": "\n{question}"},
        "stages": [{"name": "sft", "tokens": steps * 8 * 32, "trainable": "all",
                    "mixture": {"text": 0.0, "instructions": 1.0},
                    "schedule": {"kind": "cosine", "peak": 3e-3, "final": 1e-4, "warmup_steps": 5},
                    "checkpoint_fractions": [1.0]}],
    }
    cfg = tmp_path / "mine.yaml"
    cfg.write_text(yaml.safe_dump(recipe))
    return d, cfg


def test_own_data_commands_prepare_a_recipe_that_passes_the_check(tmp_path, capsys):
    """Fast: every preparation command of the walk-through, then `megavlm train --check`."""
    from megavlm.cli import main as megavlm

    d, cfg = _prepare(tmp_path, steps=2)
    assert megavlm(["train", "--config", str(cfg), "--check"]) == 0
    assert "ready to train" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_own_data_walkthrough_beats_the_majority_class(tmp_path, capsys):
    """The whole walk-through (about 40 s of CPU): train 60 steps, then score own questions."""
    from megavlm.cli import main as megavlm
    from megavlm.eval.cli import main as megavlm_eval

    d, cfg = _prepare(tmp_path, steps=60)
    assert megavlm(["train", "--config", str(cfg), "--check"]) == 0
    assert megavlm(["train", "--config", str(cfg)]) == 0
    capsys.readouterr()
    rc = megavlm_eval(["vision", "--checkpoint", str(tmp_path / "runs" / "mine" / "sft" / "latest"),
                       "--task", "generic", "--questions", str(d / "questions.jsonl"), "--embeds", str(d / "test"),
                       "--max-new-tokens", "3"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["prompt"] == {"template": "\n{question}", "source": "checkpoint (data.prompt_template)"}
    majority = 0.5  # 5 red, 5 blue
    assert out["generic"]["n"] == 10 and out["generic"]["accuracy"] > majority, out
