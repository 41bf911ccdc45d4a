"""megavlm.train.plan: every stage resolved once into a frozen StagePlan, read by everyone."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from megavlm.config import load_config
from megavlm.train.plan import plan_run
from tests.synthetic import tiny_run

ROOT = Path(__file__).resolve().parents[2]


def test_a_stage_plan_carries_the_stage_s_own_values(tmp_path):
    raw = tiny_run(str(tmp_path / "run"), steps=3)
    raw["stages"][1].update(seq_length=16, weight_decay=0.0, pack_window=4,
                            init={"stage": "text", "fraction": 0.5}, schedule={"kind": "continue"})
    run = load_config(raw=raw)
    text, image = plan_run(run).values()
    assert (text.seq_length, image.seq_length) == (32, 16)
    assert image.loader.seq_length == 16 and image.loader.pack_window == 4 and image.loader.stage == "image"
    assert image.tokens_per_step == 8 * 16 and image.steps == -(-image.config.tokens // (8 * 16))
    assert image.optimizer.weight_decay == 0.0 and text.optimizer.weight_decay == run.optimizer.weight_decay
    assert image.checkpoints[-1] == (1.0, image.steps)
    assert image.schedule.kind == "continue" and image.schedule.parent is text.schedule
    with pytest.raises(dataclasses.FrozenInstanceError):
        image.seq_length = 32  # type: ignore[misc]


def _imports(path: Path) -> set[str]:
    out = set()
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.ImportFrom) and n.module:
            out.add(n.module)
        elif isinstance(n, ast.Import):
            out.update(a.name for a in n.names)
    return out


def test_schedule_is_pure_and_budget_does_not_import_it():
    sched = {m for m in _imports(ROOT / "megavlm/train/schedule.py") if m.startswith("megavlm")}
    assert sched == {"megavlm.config"}
    budget = _imports(ROOT / "megavlm/train/budget.py")
    assert "megavlm.train.schedule" not in budget and "megavlm.train.plan" not in budget


def test_one_constructor_of_the_stage_loader():
    calls = [f"{p.relative_to(ROOT)}:{n.lineno}" for p in sorted((ROOT / "megavlm").rglob("*.py"))
             for n in ast.walk(ast.parse(p.read_text()))
             if isinstance(n, ast.Call) and getattr(n.func, "id", getattr(n.func, "attr", None)) == "StageLoader"]
    assert calls == ["megavlm/train/plan.py:" + calls[0].split(":")[1]], calls
