"""Metric sinks beyond ``metrics.jsonl``: TensorBoard events and a Weights & Biases run.

Both are optional dependencies (``pip install 'megavlm[logging]'``). Asking for one that is not
installed is a one-line error at the start of training (:func:`check_available`), never a
traceback after hours of training. Only the logging rank opens sinks; every other rank gets an
empty :class:`Sinks`, so callers never branch. Each scalar is logged under ``<stage>/<name>``
at the stage's step in TensorBoard; W&B (whose step must only grow over a run of several stages)
gets its own counter and ``<stage>/step`` as a value. Evaluation scores go under
``eval/<stage>/...`` at the checkpoint's step.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from megavlm.config import ConfigError, RunConfig

SCALARS = ("loss", "lr", "grad_norm", "tokens_per_s", "image_text_ratio", "padding_fraction",
           "patch_fraction", "loss_tokens")


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def check_available(run: RunConfig) -> None:
    """Raise ConfigError (one line) when the config asks for a sink whose package is absent."""
    t = run.logging
    if t.tensorboard_dir is not None and _missing("tensorboard"):
        raise ConfigError("logging.tensorboard_dir is set but the tensorboard package is not installed "
                          "(pip install tensorboard, or pip install 'megavlm[logging]')")
    if t.wandb is not None and t.wandb.mode != "disabled" and _missing("wandb"):
        raise ConfigError("logging.wandb is set but the wandb package is not installed "
                          "(pip install wandb, or pip install 'megavlm[logging]'; or wandb.mode=disabled)")


class Sinks:
    """The open sinks of the logging rank (none elsewhere)."""

    def __init__(self, run: RunConfig, enabled: bool):
        self.tb = self.wb = None
        if not enabled:
            return
        check_available(run)
        root = Path(run.run_dir)
        t = run.logging
        if t.tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            d = Path(t.tensorboard_dir).expanduser()
            self.tb = SummaryWriter(log_dir=str(d if d.is_absolute() else root / d))
        if t.wandb is not None and t.wandb.mode != "disabled":
            import wandb

            w = t.wandb
            wdir = Path(w.dir).expanduser() if w.dir else root
            wdir.mkdir(parents=True, exist_ok=True)
            # resume="allow" with a stable id: a requeued job continues the same W&B run
            self.wb = wandb.init(project=w.project, name=w.name or root.name, mode=w.mode, dir=str(wdir),
                                 id=_run_id(root), resume="allow", config=run.to_dict())

    def __enter__(self) -> "Sinks":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def step(self, rec: dict, global_step: int) -> None:
        """One metrics.jsonl record (megavlm.train.loop) as scalars at ``global_step``."""
        stage = rec["stage"]
        vals = {f"{stage}/{k}": float(rec[k]) for k in SCALARS
                if rec.get(k) is not None and math.isfinite(float(rec[k]))}
        vals[f"{stage}/skipped"] = 1.0 if rec.get("skipped") else 0.0
        vals[f"{stage}/step"] = float(rec["step"])
        self._log(vals, global_step)

    def scores(self, scores: dict[str, float], global_step: int, prefix: str = "eval") -> None:
        """Evaluation scores (task -> value) at ``global_step``."""
        self._log({f"{prefix}/{k}": float(v) for k, v in scores.items()
                   if v is not None and math.isfinite(float(v))}, global_step)

    def _log(self, vals: dict[str, float], global_step: int) -> None:
        if self.tb is not None:
            for k, v in vals.items():
                self.tb.add_scalar(k, v, global_step)
            self.tb.flush()
        if self.wb is not None:
            self.wb.log(vals)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wb is not None:
            self.wb.finish()
        self.tb = self.wb = None


def _run_id(run_dir: Path) -> str:
    import hashlib

    return "megavlm-" + hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:12]


def report_scores(report: dict) -> dict[str, float]:
    """The scalar scores of an evaluation report (megavlm.eval.report.build_report)."""
    out = {}
    for kind in ("text", "vision"):
        for task, r in (report.get(kind) or {}).items():
            if isinstance(r, dict) and r.get("accuracy") is not None:
                out[f"{kind}/{task}"] = r["accuracy"]
    for kind, v in (report.get("stable_score") or {}).items():
        if v is not None:
            out[f"stable_score/{kind}"] = v
    return out


def log_eval_report(report: dict) -> bool:
    """Log an evaluation report's scores to the sinks its checkpoint's run config enables (at the
    checkpoint's step); returns whether any sink was enabled. Called by ``megavlm eval all``."""
    from megavlm.run_folder import CHECKPOINTS, CONFIG, META
    from megavlm.config import load_config

    ck = Path(report["checkpoint"])
    if not (ck / CONFIG).is_file():
        return False
    run = load_config(ck / CONFIG)
    if run.logging.tensorboard_dir is None and (run.logging.wandb is None or run.logging.wandb.mode == "disabled"):
        return False
    import json
    import warnings

    try:  # the report is written already: a missing package costs the sink, not the evaluation
        check_available(run)
    except ConfigError as e:
        warnings.warn(f"evaluation scores not logged: {e}")
        return False
    if ck.parent.name == CHECKPOINTS:  # the run folder where it is now, wherever it was trained
        run.run_dir = str(ck.parents[2])

    meta = json.loads((ck / META).read_text()) if (ck / META).is_file() else {}
    sinks = Sinks(run, enabled=True)
    try:
        sinks.scores(report_scores(report), int(meta.get("step", 0)), prefix=f"eval/{report.get('stage')}")
    finally:
        sinks.close()
    return True
