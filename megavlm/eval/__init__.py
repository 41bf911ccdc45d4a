"""Evaluation as a library (``megavlm.eval.api.evaluate(checkpoint, EvalSpec) -> Report``), with the
lm-eval adapter and runner (text), the lmms-eval model (vision), vision scorers and tasks, readers
of the benchmarks' published files (formats), the paper suite, data-parallel sharding, stable score
and reports. It imports none of megavlm.demo / experiment / prepare: suites built elsewhere (the
demo's offline suites) are handed in.

Importing the package registers the lm-eval model ``megavlm`` when lm-eval (the ``eval`` extra)
is installed, so ``lm_eval.simple_evaluate(model="megavlm", model_args="checkpoint=…")`` works
after ``import megavlm.eval``. Without lm-eval the scorers and vision tasks still import. The
lmms-eval model (megavlm.eval.lmms_adapter) is found by lmms-eval through the package's entry
point and is not imported here (lmms-eval is heavy to import).
"""

from importlib.util import find_spec

if find_spec("lm_eval") is not None:
    from megavlm.eval import lm_adapter  # noqa: F401  (registers the model name)
