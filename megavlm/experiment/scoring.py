"""The one place the demo and the sweep reach the evaluation code (megavlm.eval.api).

Both score a checkpoint the same way: the offline text and vision suites (the demo's,
megavlm.demo.suites.OfflineSuite) through the evaluation library, ``megavlm.eval.api.evaluate``,
with a typed spec; the report JSON + markdown land in the given folder. Only the report's typed
views are read back (megavlm.eval.api.Report).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

from megavlm.checkpoint_format import CheckpointError
from megavlm.data.indexed import DataError
from megavlm.data.tokenizer import TokenizerError
from megavlm.demo.suites import OfflineSuite
from megavlm.eval.api import EvalSpec, Report, evaluate
from megavlm.eval.runner import EvalError
from megavlm.eval.tasks import recorded_spec, spec_fields


class ScoringError(RuntimeError):
    """The evaluation of a checkpoint failed (its message carries the evaluation's own error)."""


def evaluate_checkpoint(checkpoint: str | Path, out_dir: str | Path, demo_root: Optional[str] = None,
                        limit: Optional[int] = None, batch_size: int = 32,
                        prompt_template: Optional[str] = None,
                        eval_spec: Optional[str | Path | Mapping] = None) -> dict:
    """Score ``checkpoint`` with the offline suites; returns a compact summary:

    ``{"text": {task: acc}, "vision": {task: acc}, "chance": {task: c}, "stable_score": {"text", "vision"},
    "metrics": {task: {extra metrics}}, "prompt": {"template", "source"}, "report": path}``. The full
    report (JSON + markdown) stays in ``out_dir``. ``limit`` caps the examples per task (None = all);
    ``prompt_template`` None asks the questions as the checkpoint was trained to read them.
    ``eval_spec``: a preset name (``paper-table7`` …), a spec file, a recipe with an ``eval:``
    section or that section as a mapping (megavlm.eval.tasks); default: the ``eval:`` section the
    checkpoint's run config records, when it sets anything. The spec's tasks, metrics, chance and
    vision suite instead of the offline suites (a spec's ``vision: {suite: offline}`` keeps the
    offline vision suite; a paper suite without its data root is an error before loading)."""
    try:
        common = dict(prompt_template=prompt_template, batch_size=batch_size, out_dir=out_dir,
                      **({"limit": int(limit)} if limit else {}))
        if eval_spec is None:
            eval_spec = recorded_spec(checkpoint)  # the recipe's eval: section, kept in config.yaml
        fields = spec_fields(eval_spec) if eval_spec is not None else {}
        needs_suite = "paper_root" not in fields or "text_tasks" not in fields
        suite = OfflineSuite.default(Path(demo_root).expanduser() if demo_root else None) if needs_suite else None
        spec = EvalSpec(suite=suite, **{**fields, **common})
        report = evaluate(checkpoint, spec)
    except (EvalError, CheckpointError, DataError, TokenizerError) as e:
        raise ScoringError(f"evaluation of {checkpoint} failed: {e}") from e
    return summarize(report)


def summarize(report: Report) -> dict:
    """The fields of an evaluation report that tables and plots use."""
    return {"text": report.accuracies("text"), "vision": report.accuracies("vision"), "chance": report.chance,
            "stable_score": report.stable_score, "metrics": report.metrics,
            "prompt": {"template": report.prompt.template, "source": report.prompt.source},
            "report": str(report.files[0]) if report.files else None}

