"""The paper's figures and tables from a sweep's cells: the x axes as the paper draws them (percent;
Fig. 7's instruction share of the image-text data), seeds as mean ± sample std, Fig. 5 and Fig. 6
split by the start (checkpoint vs random weights), files written."""

from __future__ import annotations

import math

import pytest

from megavlm.experiment.plots import paper_figures
from megavlm.experiment.results import figure_groups, figure_series, paper_tables, paper_x


def _row(seed, fraction, image_ratio=0.1, instruct_ratio=0.0, epochs=1, v=0.0, t=0.0):
    return {"seed": seed, "fraction": fraction, "image_ratio": image_ratio, "instruct_ratio": instruct_ratio,
            "epochs": epochs, "vision_stable": v, "text_stable": t, "vision:vqav2": 0.5 + v,
            "text:arc_easy": 0.25 + t, "text:piqa": 0.5}


GRID = {"seed": [1, 2], "fraction": [0.4, 0.8, 1.0], "image_ratio": [0.1], "instruct_ratio": [0.0], "epochs": [1]}
ROWS = [_row(1, 0.4, v=0.10, t=0.02), _row(2, 0.4, v=0.14, t=0.04),
        _row(1, 0.8, v=0.20, t=0.05), _row(2, 0.8, v=0.30, t=0.07),
        _row(1, 1.0, v=0.12, t=0.01), _row(2, 1.0, v=0.16, t=0.03)]


def test_series_are_means_and_sample_std_over_seeds_on_the_paper_axis():
    s = figure_series(ROWS, GRID, "fraction", "vision_stable")
    assert list(s) == [()]  # one line: nothing else is swept
    (x4, m4, sd4, n4, seeds4), (x8, m8, sd8, n8, _), (x10, *_rest) = s[()]
    assert (x4, x8, x10) == (40.0, 80.0, 100.0) and n4 == n8 == 2
    assert m4 == pytest.approx(0.12) and sd4 == pytest.approx(math.sqrt(2 * 0.02 ** 2))  # |0.10-0.12|, |0.14-0.12|
    assert m8 == pytest.approx(0.25) and sd8 == pytest.approx(0.05 * math.sqrt(2))
    assert sorted(seeds4) == [0.10, 0.14]


def test_instruct_axis_is_the_share_of_image_text_data():
    # the paper holds image-text data at 10 % and varies its split (Fig. 7)
    assert paper_x({"image_ratio": 0.075, "instruct_ratio": 0.025}, "instruct_ratio") == pytest.approx(25.0)
    assert paper_x({"image_ratio": 0.0, "instruct_ratio": 0.0}, "instruct_ratio") == 0.0
    assert paper_x({"epochs": 4}, "epochs") == 4.0 and paper_x({"image_ratio": 0.15}, "image_ratio") == 15.0


def test_fig5_and_fig6_are_split_by_the_start():
    grid = {**GRID, "fraction": [0.0, 0.8], "image_ratio": [0.1, 0.3]}
    rows = [_row(s, f, image_ratio=r, v=0.1 * s) for s in (1, 2) for f in (0.0, 0.8) for r in (0.1, 0.3)]
    groups = {key: rs for _, key, rs in figure_groups(rows, grid)}
    assert set(groups) == {"fraction", "image_ratio", "image_ratio@0"}
    assert {r["fraction"] for r in groups["image_ratio"]} == {0.8}
    assert {r["fraction"] for r in groups["image_ratio@0"]} == {0.0}


def test_tables_and_figures(tmp_path):
    md = paper_tables(ROWS, GRID, scale_note="toy scale")
    assert "#### Fig. 4: text pre-training completion before image data (%) (toy scale)" in md
    assert "| 80 | – | 2 | +0.250 ± 0.071 | +0.060 ± 0.014 | +0.200, +0.300 | +0.050, +0.070 |" in md
    assert "| 100 (re-warmed) |" in md
    paths = paper_figures(ROWS, GRID, tmp_path, scale_note="toy scale")
    assert [p.name for p in paths] == ["fig4_fraction.png"]
    assert paths[0].stat().st_size > 5000
    assert not list(tmp_path.glob("*.tmp.png"))


def test_each_varied_variable_gets_its_paper_figure(tmp_path):
    grid = {"seed": [1, 2], "fraction": [0.0, 0.8], "image_ratio": [0.1, 0.3], "instruct_ratio": [0.0],
            "epochs": [1, 2]}
    rows = [_row(s, f, image_ratio=r, epochs=e, v=0.01 * s * e) for s in (1, 2) for f in (0.0, 0.8)
            for r in (0.1, 0.3) for e in (1, 2)]
    names = sorted(p.name for p in paper_figures(rows, grid, tmp_path))
    assert names == ["fig4_fraction.png", "fig5_image_ratio.png", "fig6_image_ratio_scratch.png", "fig8_epochs.png"]
    # Fig. 8's lines are the other swept variables' values, never averaged over them
    lines = figure_series(rows, grid, "epochs", "vision_stable")
    assert set(lines) == {(("fraction", f), ("image_ratio", r)) for f in (0.0, 0.8) for r in (0.1, 0.3)}
    assert all(n == 2 for pts in lines.values() for _, _, _, n, _ in pts)
