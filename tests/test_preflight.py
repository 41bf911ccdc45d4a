"""megavlm.preflight: every stage's data, init checkpoints, run folder and disk, checked before
anything trains or is written; every problem at once, one line each."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from megavlm import preflight
from megavlm.cli import main as cli_main
from megavlm.config import load_config
from tests.data.conftest import corpus, make_text, sp_model, tok  # noqa: F401  (fixtures)
from tests.synthetic import tiny_run


def _recipe(tmp_path, root, **extra) -> str:
    raw = tiny_run(str(tmp_path / "run"))
    raw["model"]["vision"] = {"embed_dim": 8, "num_patches": 4}
    raw["model"]["vocab_size"] = 512
    raw["stages"][1]["init"]["fraction"] = 0.5
    raw["data"] = {"root": str(root), "tokenizer": "tokenizer.model", "instructions": ["instructions"]}
    raw["stages"].append({"name": "sft", "tokens": 3 * 256, "init": {"stage": "image", "fraction": 1.0},
                          "mixture": {"text": 0.0, "instructions": 1.0},
                          "schedule": {"kind": "rewarm", "peak": 1e-4, "final": 0.0, "warmup_steps": 1},
                          "checkpoint_fractions": [1.0]})
    for k, v in extra.items():
        raw[k] = v
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_ready_recipe_has_no_problem_and_check_writes_nothing(tmp_path, corpus, capsys):  # noqa: F811
    cfg = _recipe(tmp_path, corpus)
    assert preflight.check_run(load_config(cfg)) == []
    assert cli_main(["train", "--config", cfg, "--check"]) == 0
    assert "ready to train (3 stages checked)" in capsys.readouterr().out
    assert cli_main(["plan", "--config", cfg, "--check"]) == 0
    assert not (tmp_path / "run").exists()


def test_every_problem_of_every_stage_at_once(tmp_path, corpus, capsys):  # noqa: F811
    root = tmp_path / "bad"
    shutil.copytree(corpus, root)
    (root / "instructions.idx").unlink()                       # a later stage's set: missing
    meta = json.loads((root / "captions.embeds.json").read_text())
    meta["embed_dim"] = 16                                      # another encoder width
    (root / "captions.embeds.json").write_text(json.dumps(meta))
    with open(root / "text.bin", "ab") as f:                    # index/bin mismatch
        f.write(b"\0\0")
    cfg = _recipe(tmp_path, root, model={**tiny_run("x")["model"], "vocab_size": 128,
                                         "vision": {"embed_dim": 8, "num_patches": 4}})
    cfg_init = load_config(cfg, ["stages.0.init.path=" + str(tmp_path / "nope")])
    problems = preflight.check_run(cfg_init)
    text = "\n".join(problems)
    assert f"{root / 'instructions.idx'}: missing" in text and "stage sft" in text
    assert f"{root / 'captions.embeds.json'}: embeddings are 16 wide" in text
    assert f"{root / 'text.bin'}" in text and "truncated or mismatched" in text
    assert "tokenizer has" in text and "model.vocab_size=128" in text
    assert f"{tmp_path / 'nope'}: missing (init.path of stage text)" in text
    assert len(problems) == 5, problems
    assert cli_main(["train", "--config", cfg, "--check"]) == 2
    err = capsys.readouterr().err
    assert "problem(s) before training" in err and err.count("\n  ") >= 3
    assert f"tools/preprocess_conversations.py --input CONVERSATIONS.json --embeds {root / 'captions'} " \
           f"--output {root / 'instructions'}" in err  # says exactly what to run for the missing set
    assert cli_main(["train", "--config", cfg]) == 2  # training refuses before writing anything
    assert not (tmp_path / "run").exists()


def test_init_checkpoint_must_be_complete_and_of_this_shape(tmp_path, corpus):  # noqa: F811
    ck = tmp_path / "ck"
    ck.mkdir()
    run = load_config(_recipe(tmp_path, corpus), [f"stages.0.init.path={ck}"])
    assert any("not a complete megavlm checkpoint" in p for p in preflight.check_init(run))
    (ck / "meta.json").write_text("{}")
    other = run.to_dict()
    other["model"]["hidden_size"] = 256
    (ck / "config.yaml").write_text(yaml.safe_dump(other))
    (p,) = preflight.check_init(run)
    assert "hidden_size=256 (recipe 64)" in p


def test_output_folder_and_disk(tmp_path, corpus, monkeypatch):  # noqa: F811
    (tmp_path / "file").write_text("x")
    run = load_config(_recipe(tmp_path, corpus), [f"run_dir={tmp_path / 'file' / 'run'}"])
    assert "lies under a file" in preflight.check_output(run)[0]
    run = load_config(_recipe(tmp_path, corpus))
    assert preflight.checkpoint_bytes(run) == preflight.parameter_count(run) * 16 > 0
    monkeypatch.setattr(preflight, "BYTES_PER_PARAM", 1 << 40)
    assert "GiB free, the first checkpoint needs" in preflight.check_output(run)[0]


def test_config_differences_ignore_harmless_keys():
    a = {"run_dir": "a", "train": {"log_every": 1, "lr": 1}, "stages": [{"name": "text", "tokens": 5, "save_every": 1}]}
    b = {"run_dir": "b", "train": {"lr": 1}, "logging": {"log_every": 9}, "stages": [{"name": "text", "tokens": 6, "save_every": 3}]}
    assert preflight.config_differences(a, b) == ["stages.text.tokens: 5 -> 6"]


def test_run_folder_of_another_config_or_data_is_refused(tmp_path, corpus):  # noqa: F811
    root = tmp_path / "data"
    shutil.copytree(corpus, root)
    run = load_config(_recipe(tmp_path, root))
    preflight.record_run(run)
    step = Path(run.run_dir) / "text" / "checkpoints" / "step_0000001"
    step.mkdir(parents=True)
    (step / "meta.json").write_text(json.dumps({"stage": "text", "step": 1, "steps": 3}))
    assert preflight.check_run_folder(run) == []
    assert preflight.check_run_folder(load_config(_recipe(tmp_path, root), ["logging.log_every=7"])) == []
    assert preflight.check_run_folder(load_config(_recipe(tmp_path, root), ["train.micro_batch_size=4"])) == []
    changed = load_config(_recipe(tmp_path, root), ["stages.1.tokens=1024"])
    with pytest.raises(preflight.RunFolderError, match=r"stages.image.tokens: 768 -> 1024.*--force-config"):
        preflight.require_same_run(changed)
    np.save(root / "instructions.images.npy", np.zeros(3, dtype=np.int64))
    assert preflight.check_run_folder(run) == ["data instructions.images.npy: changed"]


def test_a_stage_with_its_own_seq_length_is_checked_at_that_length(tmp_path, corpus):  # noqa: F811
    """Preflight opens each stage's sets at the stage's own row length (it used model.seq_length, so a
    stage whose shorter rows refuse a long caption passed preflight and failed when the stage began)."""
    cfg = _recipe(tmp_path, corpus)
    base = ["data.too_long=reject", "model.seq_length=256"]
    assert preflight.check_run(load_config(cfg, base)) == []
    problems = preflight.check_run(load_config(cfg, base + ["stages.image.seq_length=12"]))
    assert len(problems) == 1, problems
    assert "captions.bin: record" in problems[0] and "(12)" in problems[0] and "stage image" in problems[0]
    # the same check through the command: refused before anything is written
    with pytest.raises(preflight.PreflightError, match="stage image"):
        preflight.require_ready(load_config(cfg, base + ["stages.image.seq_length=12"]))
    assert not (tmp_path / "run").exists()
