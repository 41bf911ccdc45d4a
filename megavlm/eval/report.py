"""The evaluation report of one checkpoint: a JSON for machines and a markdown table for people.

Written into the run directory (``<run_dir>/eval/<stage>-step_XXXXXXX.{json,md}``) next to the
checkpoints it describes, so the scores of every stage's checkpoints sit in one place.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional, Sequence

from megavlm.run_folder import EVAL_DIR, META, report_stem, run_dir_of  # noqa: F401  (run_dir_of: re-export)
from megavlm.eval.stable_score import DEFAULT_PRESET, chance, preset, stable_score
from megavlm.eval.vision import TaskResult


def build_report(checkpoint: str | Path, text: dict[str, float], vision: Sequence[TaskResult],
                 extra: Optional[dict] = None, chance_preset: str = DEFAULT_PRESET,
                 own: Sequence[tuple[TaskResult, float]] = ()) -> dict:
    """Per-task accuracy and chance, stable scores (text / vision) under the named chance preset
    (megavlm.eval.stable_score.PRESETS, recorded as ``chance_preset``), extra vision metrics.
    ``own``: the user's own tasks (``eval all --extra-task``) with the chance level they were
    given (0 unless given); listed apart, they do not enter the stable scores, which stay
    comparable with the paper's."""
    cp = chance_preset
    preset(cp)  # an unknown name fails before anything is scored
    p = Path(checkpoint).resolve()
    meta = json.loads((p / META).read_text()) if (p / META).is_file() else {}
    vis_acc = {r.task: r.accuracy for r in vision if r.accuracy is not None}
    return {
        "checkpoint": str(p), "stage": meta.get("stage"), "step": meta.get("step"),
        "fraction": meta.get("fraction"), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "chance_preset": cp,
        "text": {t: {"accuracy": a, "chance": chance(t, cp)} for t, a in text.items()},
        "vision": {r.task: {"accuracy": r.accuracy, "chance": chance(r.task, cp) if r.accuracy is not None else None,
                            "n": r.n, "seconds": round(r.seconds, 3), **r.metrics} for r in vision},
        "own": {r.task: {"accuracy": r.accuracy, "chance": c, "n": r.n, "seconds": round(r.seconds, 3), **r.metrics}
                for r, c in own},
        "stable_score": {"text": stable_score(text, cp) if text else None,
                         "vision": stable_score(vis_acc, cp) if vis_acc else None},
        **(extra or {}),
    }


def markdown(report: dict) -> str:
    def f(x):
        return "—" if x is None else f"{x:.4f}"

    lines = [f"# Evaluation of {report['stage']} step {report['step']}", "",
             f"checkpoint `{report['checkpoint']}` — {report['time']}", "",
             f"chance levels: preset `{report.get('chance_preset', DEFAULT_PRESET)}`", "",
             *([f"vision prompt: `{report['prompt_template']!r}` ({report.get('prompt_source', '?')})", ""]
               if report.get("prompt_template") else []),
             "| kind | task | accuracy | chance | accuracy − chance |", "|---|---|---|---|---|"]
    for kind in ("text", "vision", "own"):
        for t, r in report.get(kind, {}).items():
            a, c = r["accuracy"], r["chance"]
            lines.append(f"| {kind} | {t} | {f(a)} | {f(c)} | {f(a - c) if a is not None else '—'} |")
    s = report["stable_score"]
    lines += ["", f"**Stable score** — text: {f(s['text'])}, vision: {f(s['vision'])}"
              + (" (own tasks not included)" if report.get("own") else ""), ""]
    other = [(t, k, v) for kind in ("vision", "own") for t, r in report.get(kind, {}).items() for k, v in r.items()
             if k not in ("accuracy", "chance") and isinstance(v, (int, float))]
    if other:
        lines += ["| task | metric | value |", "|---|---|---|"]
        lines += [f"| {t} | {k} | {v:.4g} |" for t, k, v in other]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: Optional[str | Path] = None) -> tuple[Path, Path]:
    """Write ``<out_dir>/<stage>-step_XXXXXXX.{json,md}`` (default out_dir: ``<run_dir>/eval``)."""
    out = Path(out_dir) if out_dir else run_dir_of(report["checkpoint"]) / EVAL_DIR
    out.mkdir(parents=True, exist_ok=True)
    stem = report_stem(report["stage"], report["step"])
    j, m = out / f"{stem}.json", out / f"{stem}.md"
    j.write_text(json.dumps(report, indent=1, default=str))
    m.write_text(markdown(report))
    return j, m
