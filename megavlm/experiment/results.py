"""A sweep's results as tables: one row per finished cell, and means over seeds.

``results.md`` holds the tables of the paper's figures this grid varies (:func:`paper_tables`).
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


# ------------------------------------------------------------------ the paper's figures and tables


PAPER_FIGURES = {
    "fraction": ("fig4_fraction", "Fig. 4: text pre-training completion before image data (%)"),
    "image_ratio": ("fig5_image_ratio", "Fig. 5: image-caption share of image-text pre-training (%)"),
    "image_ratio@0": ("fig6_image_ratio_scratch", "Fig. 6: image-caption share, from scratch (%)"),
    "instruct_ratio": ("fig7_instruct_ratio", "Fig. 7: instruction share of the image-text data (%)"),
    "epochs": ("fig8_epochs", "Fig. 8: fine-tuning epochs"),
}
"""Swept variable -> (file stem, x-axis label) of the paper's figure that varies it. Fig. 6 is
Fig. 5's axis for cells whose image stage starts from random weights (``fraction = 0``)."""


def paper_x(row: dict, variable: str) -> float:
    """A cell's position on the paper's x axis: percent for fractions and ratios (Fig. 7: the
    instruction share *of the image-text data*, instruct / (captions + instruct), as the paper holds
    that data at 10 % and varies its split), the epoch count as is."""
    if variable == "epochs":
        return float(row["epochs"])
    if variable == "instruct_ratio":
        img = row["image_ratio"] + row["instruct_ratio"]
        return 100.0 * row["instruct_ratio"] / img if img > 0 else 0.0
    return 100.0 * row[variable]


def figure_series(rows: Sequence[dict], grid: dict[str, list], variable: str,
                  score: str) -> dict[tuple, list[tuple[float, float, float, int, list[float]]]]:
    """The points the paper's figure of ``variable`` draws for ``score`` (a row key): per line
    (the values of the other swept variables), sorted (x, mean, sample std, n, per-seed values)
    over seeds. Rows without the score are left out."""
    others = [k for k in ORDER if k not in ("seed", variable) and len(grid.get(k, [])) > 1]
    lines: dict[tuple, dict[float, list[float]]] = {}
    for r in rows:
        if r.get(score) is None:
            continue
        lines.setdefault(tuple((k, r[k]) for k in others), {}).setdefault(paper_x(r, variable), []).append(r[score])
    out = {}
    for key, pts in sorted(lines.items()):
        out[key] = [(x, *_mean_std(v), len(v), list(v)) for x, v in sorted(pts.items())]
    return out


def figure_groups(rows: Sequence[dict], grid: dict[str, list]) -> list[tuple[str, str, list[dict]]]:
    """(variable, PAPER_FIGURES key, cells) of every paper figure the grid varies: Fig. 5 takes the
    image-ratio cells that start from a text checkpoint, Fig. 6 those at fraction 0."""
    out = []
    for v in ("fraction", "image_ratio", "instruct_ratio", "epochs"):
        if len(grid.get(v, [])) < 2:
            continue
        if v == "image_ratio":
            warm = [r for r in rows if r["fraction"] != 0.0]
            cold = [r for r in rows if r["fraction"] == 0.0]
            out += [(v, "image_ratio", warm)] if warm else []
            out += [(v, "image_ratio@0", cold)] if cold else []
        else:
            out.append((v, v, list(rows)))
    return out


def _mean_std(vals: Sequence[float]) -> tuple[float, float]:
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return m, sd


def _pm(pts_by_x: dict, x: float) -> str:
    p = pts_by_x.get(x)
    return "–" if p is None else f"{p[1]:+.3f} ± {p[2]:.3f}"


def paper_tables(rows: Sequence[dict], grid: dict[str, list], scale_note: str = "") -> str:
    """Markdown tables of the paper's figures: per figure, one row per point of its x axis (and
    line), the vision and text stable scores as mean ± sample std over seeds, n and each seed's
    values — the numbers the figures draw, for a page such as docs/reproduction.md."""
    lines = []
    for variable, key, rs in figure_groups(rows, grid):
        stem, xlabel = PAPER_FIGURES[key]
        vis = figure_series(rs, grid, variable, "vision_stable")
        txt = figure_series(rs, grid, variable, "text_stable")
        note = f" ({scale_note})" if scale_note else ""
        lines += [f"#### {xlabel}{note}", "",
                  "| x | line | n | vision stable | text stable | vision per seed | text per seed |",
                  "|---|---|---|---|---|---|---|"]
        for line in sorted(set(vis) | set(txt)):
            v_by, t_by = {p[0]: p for p in vis.get(line, [])}, {p[0]: p for p in txt.get(line, [])}
            for x in sorted(set(v_by) | set(t_by)):
                label = ", ".join(f"{k}={val:g}" for k, val in line) or "–"
                n = (v_by.get(x) or t_by.get(x))[3]
                seeds = lambda by: ", ".join(f"{s:+.3f}" for s in by[x][4]) if x in by else "–"  # noqa: E731
                mark = " (re-warmed)" if variable == "fraction" and abs(x - 100.0) < 1e-9 else ""
                lines.append(f"| {x:g}{mark} | {label} | {n} | {_pm(v_by, x)} | {_pm(t_by, x)} | "
                             f"{seeds(v_by)} | {seeds(t_by)} |")
        lines.append("")
    return "\n".join(lines)


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
    md_path = sweep_dir / f"{stem}.md"
    tmp = md_path.with_name(md_path.name + ".tmp")
    tmp.write_text(f"# {stem}: {len(rows)} of {n_cells} cells finished\n\n"
                   + paper_tables(rows, plan["grid"], scale_note=f"recipe {Path(plan['config']).name}"))
    tmp.replace(md_path)
    return csv_path, json_path, rows
