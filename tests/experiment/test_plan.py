"""megavlm.experiment.plan: the shared-prefix job plan (one text run per seed, one image run per
branch, cells linking them), stage links, and the recipe fingerprint of a sweep directory."""

from __future__ import annotations

import pytest

from megavlm.experiment.grid import GridError, cells, validate
from megavlm.experiment.plan import build_jobs, count_stage_runs, link_stages, write_plan
from tests.experiment.conftest import TINY


def test_prefix_sharing_counts_stage_runs(tiny, tmp_path):
    full = validate(tiny, {"seed": [1, 2], "fraction": [0.8, 1.0], "image_ratio": [0.1, 0.2], "epochs": [1, 2, 3]})
    jobs = build_jobs(tiny, full, tmp_path)
    assert len(cells(full)) == 24
    assert count_stage_runs(jobs) == {"text": 2, "image": 8, "cell": 24}
    by_id = {j.id: j for j in jobs}
    seen = set()
    for j in jobs:  # dependencies come first, and point at the runs whose stages they link
        assert all(d in seen for d in j.deps)
        seen.add(j.id)
        for d in j.deps:
            assert by_id[d].run_dir in j.links.values()
    cell = by_id["cell/s2-f1-r0.2-i0-e3"]
    assert cell.links == {"text": str(tmp_path.resolve() / "text" / "s2"),
                          "image": str(tmp_path.resolve() / "image" / "s2-f1-r0.2-i0")}
    # every epoch count of a branch shares one image run
    assert {by_id[f"cell/s1-f0.8-r0.1-i0-e{e}"].deps[0] for e in (1, 2, 3)} == {"image/s1-f0.8-r0.1-i0"}


def test_links_resolve_shared_checkpoints(tmp_path):
    owner = tmp_path / "text" / "s1"
    (owner / "text" / "checkpoints").mkdir(parents=True)
    cell = tmp_path / "cells" / "c"
    link_stages(cell, {"text": str(owner)})
    link_stages(cell, {"text": str(owner)})  # idempotent
    assert (cell / "text").is_symlink() and (cell / "text" / "checkpoints").is_dir()
    (tmp_path / "other" / "text").mkdir(parents=True)
    with pytest.raises(GridError, match="exists"):
        link_stages(cell, {"text": str(tmp_path / "other")})


def test_changed_recipe_refuses_old_sweep_dir(tiny, tmp_path):
    full = validate(tiny, {})
    jobs = build_jobs(tiny, full, tmp_path)
    write_plan(tmp_path, str(TINY), [], full, jobs, None)
    write_plan(tmp_path, str(TINY), [], full, jobs, None)  # same recipe: fine
    with pytest.raises(GridError, match="different recipe"):
        write_plan(tmp_path, str(TINY), ["stages.0.tokens=4096"], full, jobs, None)
