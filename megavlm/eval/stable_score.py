"""The stable score: mean over tasks of (accuracy - chance), for text and vision separately.

Subtracting chance puts a 2-way and a 5-way task on one scale (a model that guesses scores 0 on
both), which is how the paper compares checkpoints. The chance table lives only here; a task
without an entry is an error rather than a silent chance of 0, except for free-form answers
(VQA-style generation), whose chance is 0 by definition and which are marked as such.
"""

from __future__ import annotations

from typing import Mapping

CHANCE: dict[str, float] = {
    # the paper's text suite (lm-eval task names)
    "agieval_lsat_ar": 0.20,
    "arc_easy": 0.25,
    "bigbench_conceptual_combinations_multiple_choice": 0.25,
    "boolq": 0.50,
    "copa": 0.50,
    "hellaswag": 0.25,
    "mathqa": 0.20,
    "piqa": 0.50,
    "pubmedqa": 1 / 3,
    # the paper's vision suite
    "vqav2": 0.0,
    "gqa": 0.0,
    "textvqa": 0.0,
    "textvqa_ocr": 0.0,
    "pope": 0.50,
    "refcoco": 0.0,
    "refcoco+": 0.0,
    "refcocog": 0.0,
    "ocid_ref": 0.0,
    # the offline suites (megavlm.eval.suites)
    "megavlm_wordnet_mc": 0.25,
    "megavlm_heldout_cloze": 0.25,
    "fashion_vqa": 0.0,
    "offline_pope": 0.50,
}

TEXT_TASKS = ("agieval_lsat_ar", "arc_easy", "bigbench_conceptual_combinations_multiple_choice", "boolq",
              "copa", "hellaswag", "mathqa", "piqa", "pubmedqa")
"""The paper's text suite, the default of ``megavlm eval text`` where the datasets are reachable."""


def chance(task: str) -> float:
    if task not in CHANCE:
        raise KeyError(f"no chance level for task {task!r}; add it to megavlm.eval.stable_score.CHANCE")
    return CHANCE[task]


def stable_score(accuracies: Mapping[str, float]) -> float:
    """Mean over the given tasks of accuracy - chance (accuracies in [0, 1])."""
    if not accuracies:
        raise ValueError("the stable score needs at least one task")
    for t, a in accuracies.items():
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"task {t}: accuracy {a} is not in [0, 1]")
    return sum(a - chance(t) for t, a in accuracies.items()) / len(accuracies)
