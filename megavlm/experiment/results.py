"""A sweep's results as tables: one row per finished cell, and means over seeds.

``results.json`` (``results-<tag>.json`` for a tagged grid) holds the grid, every cell's scores (stable scores and per-task accuracies) and
the per-point aggregate (mean, sample std and count over seeds); ``results.csv`` is the flat
per-cell table for spreadsheets.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Sequence

from megavlm.experiment.grid import ORDER
from megavlm.experiment.plan import DONE, plan_jobs, read_plan

SCORES = ("vision_stable", "text_stable")


def cell_rows(sweep_dir: Path) -> list[dict]:
    """Rows of the finished cells: the variables, the two stable scores, per-task accuracies."""
    rows = []
    for job in plan_jobs(read_plan(sweep_dir)):
        if job.kind != "cell" or not job.done():
            continue
        rec = json.loads((Path(job.run_dir) / DONE).read_text())
        ev = rec["eval"]
        row = dict(job.cell)
        row["vision_stable"] = ev["stable_score"]["vision"]
        row["text_stable"] = ev["stable_score"]["text"]
        for kind in ("vision", "text"):
            for task, acc in sorted(ev[kind].items()):
                row[f"{kind}:{task}"] = acc
        row["train_seconds"] = round(rec.get("train_seconds", 0.0), 1)
        row["eval_seconds"] = round(rec.get("eval_seconds", 0.0), 1)
        row["run_dir"] = job.run_dir
        rows.append(row)
    return rows


def aggregate(rows: Sequence[dict]) -> list[dict]:
    """Mean, sample std and n over seeds of each score, per point of the non-seed variables."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in ORDER if k != "seed"), []).append(r)
    out = []
    for key, rs in groups.items():
        point = dict(zip([k for k in ORDER if k != "seed"], key))
        point["n"] = len(rs)
        for s in SCORES:
            vals = [r[s] for r in rs if r[s] is not None]
            m = sum(vals) / len(vals) if vals else None
            sd = (math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0) if vals else None
            point[f"{s}_mean"], point[f"{s}_std"] = m, sd
        out.append(point)
    return out


def write_results(sweep_dir: Path) -> tuple[Path, Path, list[dict]]:
    """Write ``results.csv`` and ``results.json`` in the sweep directory; returns the rows too."""
    sweep_dir = Path(sweep_dir)
    plan = read_plan(sweep_dir)
    rows = cell_rows(sweep_dir)
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    stem = f"results-{plan['tag']}" if plan.get("tag") else "results"
    csv_path = sweep_dir / f"{stem}.csv"
    tmp = csv_path.with_name(csv_path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(csv_path)
    n_cells = sum(1 for j in plan["jobs"] if j["kind"] == "cell")
    json_path = sweep_dir / f"{stem}.json"
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(json.dumps({"grid": plan["grid"], "cells_finished": len(rows), "cells": n_cells,
                               "rows": rows, "aggregate": aggregate(rows)}, indent=1))
    tmp.replace(json_path)
    return csv_path, json_path, rows
