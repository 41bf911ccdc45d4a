"""megavlm.run_folder names every file of a run folder and of a prepared set; no other module spells
those names (a literal elsewhere is how a writer and a reader drift apart)."""

from __future__ import annotations

import ast
from pathlib import Path

from megavlm import run_folder as rf

ROOT = Path(__file__).resolve().parents[1] / "megavlm"
NAMES = {rf.CONFIG, rf.RECORDED_DATA, rf.METRICS, rf.META, rf.EMBEDS_META, rf.IMAGES, rf.CONVERSATION_META,
         *rf.CONVERSATION, *rf.EMBEDS}
ELSEWHERE: dict[str, str] = {}
"""Modules allowed to spell a name (with the reason); none now."""


def literals(path: Path) -> list[tuple[int, str]]:
    return [(n.lineno, n.value) for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in NAMES]


def test_no_module_spells_a_run_folder_name():
    found = {str(f.relative_to(ROOT)): literals(f) for f in sorted(ROOT.rglob("*.py"))
             if f.name != "run_folder.py"}
    spelled = {f: hits for f, hits in found.items() if hits and f not in ELSEWHERE}
    assert not spelled, f"use megavlm.run_folder instead of these literals: {spelled}"
    assert literals(ROOT / "run_folder.py")  # the check sees literals at all


def test_names_and_layout():
    assert rf.step_dir_name(80) == "step_0000080" and rf.report_stem("sft", 80) == "sft-step_0000080"
    assert rf.report_stem(None, None) == "checkpoint-step_0000000"
    assert rf.loader_state_file("/c", 3) == Path("/c/loader/dp3.json")
    assert rf.run_dir_of("/r/sft/checkpoints/step_0000080") == Path("/r").resolve()
    assert [p.name for p in rf.set_files("instructions", "/d/x")] == [
        "x.bin", "x.idx", "x.mask.bin", "x.mask.idx", "x.images.npy", "x.meta.json"]
    assert [p.name for p in rf.set_files("captions", "/d/c", embeds=False)] == ["c.bin", "c.idx", "c.embeds.json"]
    assert rf.set_files("tokenizer", "/d/t.model") == [Path("/d/t.model")]


def test_checkpoint_writer_and_readers_agree(tmp_path):
    """A checkpoint folder laid out with run_folder's names is what the readers find."""
    from megavlm.checkpoint_format import latest, resolve_checkpoint

    ck = tmp_path / "run" / "sft" / rf.CHECKPOINTS / rf.step_dir_name(5)
    ck.mkdir(parents=True)
    (ck / rf.META).write_text('{"stage": "sft", "step": 5, "steps": 5, "fractions": [1.0]}')
    assert latest(tmp_path / "run", "sft").step == 5
    assert resolve_checkpoint(tmp_path / "run" / "sft" / rf.LATEST) == ck
