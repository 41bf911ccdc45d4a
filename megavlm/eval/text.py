"""lm-eval tasks on a loaded checkpoint (the harness itself, through megavlm.eval.lm_adapter)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Sequence

from megavlm.eval.runner import CheckpointModel, EvalError


def _quiet_git() -> None:
    """lm-eval records the git commit of the working directory by running ``git describe`` with
    its stderr on the terminal, so outside a checkout every text evaluation printed ``fatal: not a
    git repository``; ask git the same with its stderr discarded."""
    import subprocess

    try:
        import lm_eval.evaluator as ev
    except Exception:  # lm-eval absent or broken: the text tasks report that themselves
        return

    def quiet_commit() -> Optional[str]:
        try:
            return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL).strip().decode()
        except (subprocess.CalledProcessError, OSError):
            return None

    ev.get_git_commit_hash = quiet_commit


def run_text(model: CheckpointModel, tasks: Sequence[str], include_path: Optional[str | Path] = None,
             limit: Optional[float] = None, include_defaults: bool = True) -> dict:
    """Run lm-eval tasks on the model; returns lm-eval's results dict. Unknown task names are one
    error listing them."""
    # local tasks only unless the caller says otherwise (datasets reads this when first imported)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from lm_eval import simple_evaluate  # the eval extra; heavy to import
    from lm_eval.tasks import TaskManager

    from megavlm.eval.lm_adapter import MegavlmLM

    _quiet_git()
    logging.getLogger("lm-eval").setLevel(logging.WARNING)
    tm = TaskManager(include_path=str(include_path) if include_path else None,
                     include_defaults=include_defaults, verbosity="ERROR")
    known = set(tm.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise EvalError(f"lm-eval does not know the task(s) {unknown}"
                        + (f" (local tasks in {include_path}: "
                           f"{sorted(p.stem for p in Path(include_path).glob('*.yaml'))})" if include_path else ""))
    lm = MegavlmLM(model=model, batch_size=model.batch_size)
    try:
        return simple_evaluate(model=lm, tasks=list(tasks), limit=limit, task_manager=tm,
                               log_samples=False, bootstrap_iters=0, verbosity="ERROR")
    except ConnectionError as e:  # datasets raises it for hub datasets when offline
        raise EvalError(f"lm-eval tasks {list(tasks)}: a dataset is not reachable from here ({e}); "
                        f"use the offline suite (megavlm eval text --offline) or a machine with "
                        f"Hugging Face hub access") from None


def text_accuracies(results: dict) -> dict[str, float]:
    """Per task, lm-eval's ``acc`` (or ``exact_match``) from a results dict."""
    out = {}
    for task, r in results["results"].items():
        for key in ("acc,none", "exact_match,none", "acc_norm,none"):
            if key in r and isinstance(r[key], (int, float)):
                out[task] = float(r[key])
                break
    return out
