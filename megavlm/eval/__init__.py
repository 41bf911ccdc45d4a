"""Evaluation: lm-eval adapter (text), vision scorers and tasks, stable score, offline suites.

Importing the package registers the lm-eval model ``megavlm`` when lm-eval (the ``eval`` extra)
is installed, so ``lm_eval.simple_evaluate(model="megavlm", model_args="checkpoint=…")`` works
after ``import megavlm.eval``. Without lm-eval the scorers and vision tasks still import.
"""

from importlib.util import find_spec

if find_spec("lm_eval") is not None:
    from megavlm.eval import lm_adapter  # noqa: F401  (registers the model name)
