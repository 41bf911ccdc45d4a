"""Experiments over the three-stage recipe: the paper's grid (``megavlm sweep``) and the demo.

grid.py     the swept variables, their validation, and what each cell changes in a recipe
plan.py     cells -> jobs with shared prefixes (one text run per seed, one image run per branch)
executors.py  running the jobs: side by side on this machine, or one SLURM job each
results.py  results.csv / results.json from the finished cells
plots.py    the paper-style figures (sweeps) and the demo's loss / LR curves
scoring.py  the one seam to megavlm.eval: score a checkpoint with the offline suites
"""
