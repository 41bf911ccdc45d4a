"""megavlm demo: its tables, plots and outputs from synthetic metrics/scores; the full run is slow."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from megavlm.experiment import demo
from megavlm.config import load_config
from megavlm.experiment.plots import read_metrics, sweep_figures
from megavlm.train.plan import plan_run

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "launch" / "configs" / "tiny.yaml"


def _scores(vision_acc: float, text_acc: float) -> dict:
    return {"text": {"megavlm_wordnet_mc": text_acc, "megavlm_heldout_cloze": text_acc},
            "vision": {"fashion_vqa": vision_acc, "offline_pope": 0.5 + vision_acc / 2},
            "chance": {"megavlm_wordnet_mc": 0.25, "megavlm_heldout_cloze": 0.25, "fashion_vqa": 0.0,
                       "offline_pope": 0.5},
            "stable_score": {"text": text_acc - 0.25, "vision": (vision_acc + vision_acc / 2) / 2},
            "metrics": {"tuxpaint_caption_ppl": {"perplexity": 42.0}}, "report": None}


def test_score_table_has_every_task_and_both_branches():
    md = demo.score_table({"continue-80": _scores(0.4, 0.3), "rewarm-100": _scores(0.2, 0.35)})
    lines = md.splitlines()
    assert lines[0] == "| kind | task | chance | continue-80 | rewarm-100 |"
    for task in ("megavlm_wordnet_mc", "megavlm_heldout_cloze", "fashion_vqa", "offline_pope"):
        assert any(f"| {task} |" in l for l in lines)
    vision = next(l for l in lines if "**vision**" in l)
    assert "**+0.300**" in vision and "**+0.150**" in vision
    assert "| 0.400 | 0.200 |" in next(l for l in lines if "fashion_vqa" in l)
    assert "42.0" in lines[-1]


def _metrics(run, stage, lrs, loss0=6.0, tokens=2048):
    return [{"stage": stage, "step": k + 1, "loss": loss0 - 0.01 * k, "lr": lr, "tokens": tokens,
             "loss_tokens": 100, "grad_norm": 1.0, "tokens_per_s": 1000.0, "image_text_ratio": 0.0,
             "patch_fraction": 0.0} for k, lr in enumerate(lrs)]


def _write(run_dir: Path, recs):
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "metrics.jsonl").open("a") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")


def test_outputs_plots_and_summary(tmp_path):
    """write_outputs: the LR schedules of both branches come from the real schedule code."""
    run = load_config(TINY)
    rd = tmp_path / "demo"
    sched = {n: p.schedule for n, p in plan_run(run).items()}
    steps = {n: s.steps for n, s in sched.items()}
    _write(rd / demo.SHARED, _metrics(run, "text", [sched["text"].lr(t) for t in range(steps["text"])]))
    branches = {}
    for name, f in demo.BRANCHES:
        from megavlm.experiment.grid import branch_overrides

        br = load_config(TINY, branch_overrides(run, f))
        s = {n: p.schedule for n, p in plan_run(br, steps=steps).items()}
        _write(rd / name, _metrics(br, "image", [s["image"].lr(t) for t in range(steps["image"])], 3.0)
               + _metrics(br, "sft", [s["sft"].lr(t) for t in range(steps["sft"])], 2.0))
        branches[name] = rd / name
    scores = {"continue-80": _scores(0.4, 0.3), "rewarm-100": _scores(0.2, 0.35)}
    md, plots = demo.write_outputs(rd, run, branches, scores, 12.0)
    assert [p.name for p in plots] == ["loss.png", "lr.png"]
    for p in plots:
        assert p.stat().st_size > 5000
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((rd / "summary.json").read_text())
    assert summary["chance"]["continue-80"]["vision_beats_chance"] is True
    assert "## Training" in md and "| continue-80 | image |" in md and "| pretrain | text |" in md
    # the continued branch starts its image stage at the text LR of the 80 % point; rewarm starts near 0
    m = read_metrics(rd / "continue-80")["image"]
    text_lr = sched["text"].lr(0.8 * steps["text"])
    assert math.isclose(m[0]["lr"], text_lr, rel_tol=1e-9)
    assert read_metrics(rd / "rewarm-100")["image"][0]["lr"] < 0.1 * text_lr


def test_sweep_figures_one_per_swept_variable(tmp_path):
    rows = [{"seed": s, "fraction": f, "image_ratio": 0.1, "instruct_ratio": 0.0, "epochs": e,
             "vision_stable": 0.1 * f + 0.01 * s + 0.02 * e, "text_stable": 0.05 - 0.01 * e}
            for s in (1, 2) for f in (0.8, 1.0) for e in (1, 2)]
    grid = {"seed": [1, 2], "fraction": [0.8, 1.0], "image_ratio": [0.1], "instruct_ratio": [0.0], "epochs": [1, 2]}
    paths = sweep_figures(rows, grid, tmp_path)
    assert sorted(p.name for p in paths) == ["sweep_epochs.png", "sweep_fraction.png"]
    assert all(p.stat().st_size > 5000 for p in paths)


def test_stage_bars_follow_resumed_steps(capsys, monkeypatch):
    monkeypatch.setenv("MEGAVLM_PROGRESS", "1")  # bars are drawn on a terminal only; force them
    bars = demo.StageBars({"text": 10})
    bars.observe("text", 4, None)  # resumed at step 3
    assert bars.bars["text"].n == 4
    bars.observe("text", 10, None)
    assert bars.bars["text"].n == 10
    bars.close()


@pytest.mark.slow
def test_full_demo_run_and_rerun(tmp_path, capsys):
    """The whole demo at a reduced budget, then a second run that trains nothing."""
    over = ["stages.0.tokens=20480", "stages.1.tokens=8192", "stages.2.tokens=4096"]
    args = SimpleNamespace(run_dir=str(tmp_path / "demo"), config=None, overrides=over, eval_limit=8)
    assert demo.main(args) == 0
    out = capsys.readouterr().out
    assert "stable score" in out and "continue-80" in out and "rewarm-100" in out
    rd = tmp_path / "demo"
    for b in ("continue-80", "rewarm-100"):
        assert (rd / b / "text").is_symlink()
        assert any((rd / b / "eval").glob("sft-step_*.json"))
    assert (rd / "plots" / "lr.png").is_file() and (rd / "summary.md").is_file()
    assert demo.main(args) == 0
    again = capsys.readouterr()
    assert "skipping" in again.out + again.err
