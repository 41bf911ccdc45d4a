"""Experiments over the three-stage recipe: the paper's grid (``megavlm sweep``) and the demo.

grid.py     the swept variables, their validation, and what each cell changes in a recipe
plan.py     cells -> jobs with shared prefixes (one text run per seed, one image run per branch)
executors.py  running the jobs: side by side on this machine, or one SLURM job each
results.py  results.csv / results.json from the finished cells
plots.py    the paper-style figures (sweeps) and the demo's loss / LR curves
scoring.py  the one seam to megavlm.eval: score a checkpoint with the offline suites (eval.api.evaluate)
demo.py     ``megavlm demo``: the shared text stage, the two branches, evaluation and the tables

The demo run lives here, not in megavlm.demo: it is an experiment (it uses the grid's branches,
the plan's stage links, scoring and plots), and megavlm.demo holds the data and suites that
prepare and scoring build on; so the packages layer eval <- demo <- prepare <- experiment
without a cycle (tests/test_import_graph.py).
"""
