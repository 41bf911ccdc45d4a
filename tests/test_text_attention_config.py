"""stages.<i>.text_attention in the recipe, the plan and the run folder's identity (issue 25)."""
from __future__ import annotations

import json

import pytest
import yaml

from megavlm.config import ConfigError, load_config
from megavlm.preflight import config_differences
from tests.dist import ROOT

CONFIGS = ROOT / "launch" / "configs"


def test_default_is_document_and_bad_values_are_named():
    run = load_config(raw={"stages": [{"name": "text", "tokens": 1000}]})
    assert run.stages[0].text_attention == "document"
    with pytest.raises(ConfigError, match=r"stages\.0\.text_attention: 'packed' is not one of "
                                          r"\['document', 'window'\]"):
        load_config(raw={"stages": [{"name": "text", "tokens": 1000, "text_attention": "packed"}]})
    over = load_config(CONFIGS / "tiny.yaml", ["stages.image.text_attention=window"])
    assert [s.text_attention for s in over.stages] == ["document", "window", "document"]


def test_recipes_choose_window_only_where_a_dclm_checkpoint_is_continued():
    modes = {name: {s.name: s.text_attention for s in load_config(CONFIGS / f"{name}.yaml").stages}
             for name in ("paper-1b", "paper-79m", "dclm-1b", "dclm-79m", "tiny", "demo", "sweep-toy")}
    assert modes["paper-1b"] == {"image": "window", "sft": "document"}
    for name, stages in modes.items():
        if name != "paper-1b":
            assert set(stages.values()) == {"document"}, name


def test_plan_shows_the_mode_per_stage(capsys):
    from megavlm.cli import main

    assert main(["plan", "--config", str(CONFIGS / "paper-1b.yaml")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("image:") and "text attention window" in lines[0]
    assert lines[1].startswith("sft:") and "text attention document" in lines[1]
    assert main(["plan", "--config", str(CONFIGS / "paper-1b.yaml"), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [(s["name"], s["text_attention"]) for s in plan["stages"]] == [("image", "window"),
                                                                         ("sft", "document")]


def test_run_folder_identity():
    """A run folder recorded before the key existed resumes as document; switching is a change."""
    run = load_config(CONFIGS / "tiny.yaml")
    old = run.to_dict()
    for st in old["stages"]:
        del st["text_attention"]
    recorded = yaml.safe_load(yaml.safe_dump(old))
    assert config_differences(recorded, run.to_dict()) == []
    win = load_config(CONFIGS / "tiny.yaml", ["stages.image.text_attention=window"])
    assert config_differences(recorded, win.to_dict()) == [
        "stages.image.text_attention: '<unset>' -> 'window'"]
    assert config_differences(run.to_dict(), win.to_dict()) == [
        "stages.image.text_attention: 'document' -> 'window'"]
