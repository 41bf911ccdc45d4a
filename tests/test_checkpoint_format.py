"""megavlm.checkpoint_format: finding checkpoints of a stage (only committed ones, newest last,
by fraction), and the clear errors for what is not a complete checkpoint."""

from __future__ import annotations

import json

import pytest

from megavlm import checkpoint_format as cf


def _commit(run_dir, stage, step, fractions=()):
    d = cf.stage_dir(run_dir, stage) / f"step_{step:07d}"
    d.mkdir(parents=True)
    (d / cf.META).write_text(json.dumps({"stage": stage, "step": step, "steps": 10,
                                         "fractions": list(fractions)}))
    return d


def test_listing_latest_and_fractions(tmp_path):
    assert cf.list_checkpoints(tmp_path, "text") == [] and cf.latest(tmp_path, "text") is None
    _commit(tmp_path, "text", 10, [1.0])
    _commit(tmp_path, "text", 5, [0.5])
    _commit(tmp_path, "text", 7)
    (cf.stage_dir(tmp_path, "text") / ".tmp-step_0000012").mkdir()  # never committed
    (cf.stage_dir(tmp_path, "text") / "step_0000011").mkdir()  # no meta.json: not a checkpoint
    assert [c.step for c in cf.list_checkpoints(tmp_path, "text")] == [5, 7, 10]
    assert cf.latest(tmp_path, "text").step == 10
    assert cf.at_fraction(tmp_path, "text", 0.5).step == 5
    with pytest.raises(cf.CheckpointError, match=r"no checkpoint at fraction 0.25 .*\[0.5, 1.0\]"):
        cf.at_fraction(tmp_path, "text", 0.25)


def test_bad_checkpoints_are_clear_errors(tmp_path):
    d = _commit(tmp_path, "text", 1)
    (d / cf.META).write_text("{not json")
    with pytest.raises(cf.CheckpointError, match="unreadable checkpoint metadata"):
        cf.list_checkpoints(tmp_path, "text")
    with pytest.raises(cf.CheckpointError, match="not a complete megavlm checkpoint"):
        cf.require_complete(tmp_path)
    with pytest.raises(cf.CheckpointError, match="no config.yaml"):
        cf.require_complete(d, config=True)
    with pytest.raises(cf.CheckpointError, match="has no tokenizer"):
        cf.tokenizer_file(d)
    (d / cf.TOKENIZER_DIR).mkdir()
    (d / cf.TOKENIZER_DIR / "tok.model").write_bytes(b"x")
    assert cf.tokenizer_file(d).name == "tok.model"


def test_the_format_needs_neither_megatron_nor_the_trainer():
    import subprocess
    import sys

    code = ("import sys, megavlm.checkpoint_format; "
            "bad = [m for m in sys.modules if m.startswith(('megavlm.train', 'megatron'))]; "
            "assert not bad, bad")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def test_resolve_checkpoint_latest_and_not_a_checkpoint(tmp_path):
    import yaml

    a = _commit(tmp_path, "text", 3)
    b = _commit(tmp_path, "text", 12)
    c = _commit(tmp_path, "sft", 2)
    (cf.stage_dir(tmp_path, "sft") / "step_0000009").mkdir()  # never committed
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"stages": [{"name": "text"}, {"name": "sft"}]}))
    assert cf.resolve_checkpoint(a) == a
    assert cf.resolve_checkpoint(tmp_path / "text") == b == cf.resolve_checkpoint(tmp_path / "text" / "latest")
    assert cf.resolve_checkpoint(tmp_path) == c == cf.resolve_checkpoint(tmp_path / "latest")
    (tmp_path / "empty").mkdir()
    with pytest.raises(cf.CheckpointError, match="not a checkpoint"):
        cf.resolve_checkpoint(tmp_path / "empty")
    with pytest.raises(cf.CheckpointError, match="no such checkpoint"):
        cf.resolve_checkpoint(tmp_path / "nope")
