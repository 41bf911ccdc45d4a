"""`megavlm prepare` builds or checks a recipe's data before training, and training never builds.

Fast: the synthetic corpus of tests/data/conftest.py stands in for prepared data; the Debian build
itself is replaced by a recorder where only the calling order is under test (the real build has
its own slow test in tests/demo/test_corpus.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from megavlm import prepare
from megavlm.cli import main as cli_main
from megavlm.config import load_config
from megavlm.data.indexed import DataError
from megavlm.demo import corpus as demo_corpus
from tests.data.conftest import corpus, make_text, sp_model, tok  # noqa: F401  (fixtures)
from tests.synthetic import tiny_run


def _recipe(tmp_path, root, build="none", **data) -> str:
    raw = tiny_run(str(tmp_path / "run"))
    raw["model"]["vision"] = {"embed_dim": 8, "num_patches": 4}
    raw["stages"][1]["init"]["fraction"] = 0.5  # 'continue' from 1.0 is refused by the config
    raw["data"] = {"root": str(root), "build": build, "tokenizer": "tokenizer.model", **data}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_prepared_recipe_is_ready(tmp_path, corpus, capsys):  # noqa: F811
    cfg = _recipe(tmp_path, corpus)
    assert prepare.unprepared(load_config(cfg)) == []
    assert cli_main(["prepare", "--config", cfg]) == 0
    assert "ready" in capsys.readouterr().out


def test_missing_files_are_named_on_one_line(tmp_path, corpus, capsys):  # noqa: F811
    root = tmp_path / "partial"
    shutil.copytree(corpus, root)
    (root / "captions.embeds.json").unlink()
    cfg = _recipe(tmp_path, root)
    assert cli_main(["prepare", "--config", cfg]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("megavlm: error:")
    assert f"{root / 'captions.embeds.json'}: missing" in err[0]
    assert "text.idx" not in err[0]  # only what is missing
    # only the sets a stage draws from are needed: a text-only recipe is ready without captions
    run = load_config(cfg, ["stages.1.mixture.text=1.0", "stages.1.mixture.captions=0.0"])
    assert prepare.unprepared(run) == []


def test_demo_recipe_says_which_command_prepares_it(tmp_path):
    cfg = _recipe(tmp_path, tmp_path / "empty", build="demo")
    run = load_config(cfg)
    with pytest.raises(DataError, match=rf"run `megavlm prepare --config {cfg}` first") as e:
        prepare.require_prepared(run, cfg)
    assert "no complete demo corpus" in str(e.value)


def test_demo_cache_is_trusted_only_with_its_manifest(tmp_path, corpus):  # noqa: F811
    """An old-style marker (no per-set manifest) does not count as built, even with every file
    there: the cache must know what it holds (tests/demo/test_manifest.py covers the manifest)."""
    root = tmp_path / "demo"
    shutil.copytree(corpus, root)
    for name in ("text", "captions", "instructions"):  # the held-out twins the demo also writes
        for f in corpus.glob(f"{name}.*"):
            shutil.copy(f, root / f.name.replace(name, f"{name}_heldout", 1))
    run = load_config(_recipe(tmp_path, root, build="demo", instructions=["instructions"]))
    (root / "demo.json").write_text(json.dumps({"version": 1, "num_patches": 4, "embed_dim": 8, "full": False}))
    assert not demo_corpus.is_built(run.data, run.model.vision, vocab_size=run.model.vocab_size)
    (problem,) = prepare.unprepared(run)
    assert "no complete demo corpus" in problem and "set instructions: not in the manifest" in problem


def test_prepare_builds_before_and_training_never_builds(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(demo_corpus, "ensure_demo_corpus", lambda data, vision, **kw: calls.append(data.root))
    run = load_config(_recipe(tmp_path, tmp_path / "empty", build="demo"))
    prepare.prepare_recipe(run)
    assert calls == [str(tmp_path / "empty")]
    # the trainer's loader factory only reads: a missing corpus is a DataError naming the file
    from megavlm.train.plan import loader_spec
    from megavlm.train.stages import default_loader_factory

    from megavlm.data.tokenizer import TokenizerError

    with pytest.raises((DataError, TokenizerError), match="empty"):
        default_loader_factory(run)(loader_spec(run, run.stages[0]), _OneRank(), 1)
    assert calls == [str(tmp_path / "empty")]


class _OneRank:
    dp_rank, dp = 0, 1


def test_prepare_help_lists_both_forms(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["prepare", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "megavlm prepare --config RECIPE" in out and "megavlm prepare demo" in out
