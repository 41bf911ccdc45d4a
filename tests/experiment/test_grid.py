"""megavlm.experiment.grid: the sweep's variables are checked against the recipe before anything
runs; grids parse inline and from files; a cell becomes config overrides (continue vs rewarm)."""

from __future__ import annotations

import pytest

from megavlm.config import load_config
from megavlm.experiment.grid import Cell, GridError, cell_overrides, parse_grid, validate
from tests.experiment.conftest import TINY


def test_unknown_variable_lists_valid_choices(tiny):
    with pytest.raises(GridError) as e:
        validate(tiny, {"fractoin": [0.8]})
    msg = str(e.value)
    assert "fractoin" in msg
    for name in ("fraction", "image_ratio", "instruct_ratio", "epochs", "seed"):
        assert name in msg


@pytest.mark.parametrize("grid, needle", [
    ({"fraction": [0.5]}, "valid: 0.2, 0.4, 0.6, 0.8, 1"),
    ({"image_ratio": [1.5]}, "outside [0, 1]"),
    ({"instruct_ratio": [-0.1]}, "outside [0, 1]"),
    ({"image_ratio": [0.9], "instruct_ratio": [0.2]}, "exceed 1"),
    ({"epochs": [0]}, "epochs=0"),
    ({"seed": [1.5]}, "seed=1.5"),
    ({"fraction": []}, "no values"),
    ({"seed": [1, 1]}, "repeats"),
    ({"image_ratio": ["lots"]}, "not a number"),
])
def test_impossible_values_are_rejected(tiny, grid, needle):
    with pytest.raises(GridError, match=None) as e:
        validate(tiny, grid)
    assert needle in str(e.value)


def test_parse_grid_inline_and_file(tmp_path):
    f = tmp_path / "grid.yaml"
    f.write_text("seed: [1, 2]\nepochs: 3\n")
    g = parse_grid(["fraction=0.8,1.0", str(f)])
    assert g == {"fraction": [0.8, 1.0], "seed": [1, 2], "epochs": [3]}
    with pytest.raises(GridError, match="neither"):
        parse_grid(["no-such-file.yaml"])


def test_defaults_come_from_the_recipe(tiny):
    full = validate(tiny, {"seed": [1, 2]})
    assert full["fraction"] == [0.8] and full["image_ratio"] == [0.15] and full["instruct_ratio"] == [0.0]
    assert full["epochs"] == [1] and full["seed"] == [1, 2]


def test_cell_overrides_continue_vs_rewarm(tiny):
    cont = load_config(TINY, cell_overrides(tiny, Cell(3, 0.6, 0.2, 0.1, 1), epochs=2))
    img = cont.stage("image")
    assert cont.seed == 3 and img.init.fraction == 0.6 and img.schedule.kind == "continue"
    assert (img.mixture.text, img.mixture.captions, img.mixture.instructions) == pytest.approx((0.7, 0.2, 0.1))
    assert cont.stage("sft").epochs == 2
    base = load_config(TINY, cell_overrides(tiny, Cell(3, 1.0, 0.1, 0.0, 1), rewarm_peak=1e-3))
    sc = base.stage("image").schedule
    assert base.stage("image").init.fraction == 1.0 and sc.kind == "rewarm" and sc.peak == 1e-3
    assert sc.final == tiny.stage("text").schedule.final
