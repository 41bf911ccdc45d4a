"""megavlm.experiment.results: finished cells become rows (variables, stable scores, per-task
accuracies), unfinished ones are left out, and points aggregate over seeds (mean, sample std, n)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from megavlm.experiment.grid import validate
from megavlm.experiment.plan import DONE, build_jobs, write_plan
from megavlm.experiment.results import aggregate, write_results
from tests.experiment.conftest import TINY


def _finish(job, vision: float, text: float) -> None:
    Path(job.run_dir).mkdir(parents=True, exist_ok=True)
    (Path(job.run_dir) / DONE).write_text(json.dumps({
        "eval": {"stable_score": {"vision": vision, "text": text},
                 "vision": {"fashion_vqa": vision + 0.1}, "text": {"cloze": text + 0.25}},
        "train_seconds": 12.34, "eval_seconds": 5.0}))


def test_rows_and_seed_means(tiny, tmp_path):
    full = validate(tiny, {"seed": [1, 2, 3], "fraction": [0.8, 1.0]})
    jobs = build_jobs(tiny, full, tmp_path)
    write_plan(tmp_path, str(TINY), [], full, jobs, None)
    cells = {j.id: j for j in jobs if j.kind == "cell"}
    scores = {1: 0.3, 2: 0.5, 3: 0.7}
    for seed, v in scores.items():
        _finish(cells[f"cell/s{seed}-f0.8-r0.15-i0-e1"], v, v / 10)
    _finish(cells["cell/s1-f1-r0.15-i0-e1"], 0.1, 0.0)  # seeds 2, 3 of fraction 1.0 unfinished

    csv_path, json_path, rows = write_results(tmp_path)
    assert len(rows) == 4
    res = json.loads(json_path.read_text())
    assert res["cells_finished"] == 4 and res["cells"] == 6
    with csv_path.open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 and {"vision:fashion_vqa", "text:cloze", "vision_stable"} <= set(table[0])
    points = {p["fraction"]: p for p in res["aggregate"]}
    p8 = points[0.8]
    assert p8["n"] == 3 and p8["vision_stable_mean"] == pytest.approx(0.5)
    assert p8["vision_stable_std"] == pytest.approx(0.2)  # sample std of 0.3, 0.5, 0.7
    assert points[1.0]["n"] == 1 and points[1.0]["vision_stable_std"] == 0.0
    assert not list(tmp_path.glob("*.tmp"))


def test_aggregate_skips_missing_scores():
    rows = [{"seed": s, "fraction": 0.8, "image_ratio": 0.1, "instruct_ratio": 0.0, "epochs": 1,
             "vision_stable": v, "text_stable": None} for s, v in ((1, 0.2), (2, None), (3, 0.4))]
    (point,) = aggregate(rows)
    assert point["n"] == 3 and point["vision_stable_mean"] == pytest.approx(0.3)
    assert point["vision_stable_std"] == pytest.approx(math.sqrt(0.02))
    assert point["text_stable_mean"] is None and point["text_stable_std"] is None
