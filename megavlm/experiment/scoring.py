"""The one place the demo and the sweep reach the evaluation code (megavlm.eval).

Both score a checkpoint the same way: the offline text and vision suites through the evaluation
command's own entry (``megavlm.eval.cli.main(["all", ...])``), whose report JSON lands in the
given folder. Going through that entry rather than its internals keeps this module independent
of how the evaluation is organised inside; only the report's documented fields are read back.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Optional


class ScoringError(RuntimeError):
    """The evaluation of a checkpoint failed (its message carries the evaluation's own error)."""


def evaluate_checkpoint(checkpoint: str | Path, out_dir: str | Path, demo_root: Optional[str] = None,
                        limit: Optional[int] = None, batch_size: int = 32) -> dict:
    """Score ``checkpoint`` with the offline suites; returns a compact summary:

    ``{"text": {task: acc}, "vision": {task: acc}, "chance": {task: c}, "stable_score": {"text", "vision"},
    "metrics": {task: {extra metrics}}, "report": path}``. The full report (JSON + markdown) stays
    in ``out_dir``. ``limit`` caps the examples per task (None = all)."""
    from megavlm.eval.cli import main as eval_main

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    argv = ["all", "--checkpoint", str(checkpoint), "--out-dir", str(out_dir), "--batch-size", str(batch_size)]
    if demo_root:
        argv += ["--demo-root", str(Path(demo_root).expanduser())]
    if limit:
        argv += ["--limit", str(int(limit))]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = eval_main(argv)
    if rc != 0:
        raise ScoringError(f"evaluation of {checkpoint} failed: {err.getvalue().strip() or out.getvalue()[-500:]}")
    meta = json.loads((checkpoint / "meta.json").read_text())
    report_path = out_dir / f"{meta['stage']}-step_{int(meta['step']):07d}.json"
    return summarize_report(json.loads(report_path.read_text()), report_path)


def summarize_report(report: dict, path: Optional[Path] = None) -> dict:
    """The fields of an evaluation report that tables and plots use."""
    acc = {kind: {t: r["accuracy"] for t, r in report[kind].items() if r.get("accuracy") is not None}
           for kind in ("text", "vision")}
    chance = {t: r["chance"] for kind in ("text", "vision") for t, r in report[kind].items()
              if r.get("chance") is not None}
    metrics = {t: {k: v for k, v in r.items() if k not in ("accuracy", "chance") and isinstance(v, (int, float))}
               for t, r in report["vision"].items()}
    return {"text": acc["text"], "vision": acc["vision"], "chance": chance,
            "stable_score": dict(report["stable_score"]), "metrics": metrics,
            "report": str(path) if path else None}
