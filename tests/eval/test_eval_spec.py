"""Evaluation specs (issue 21, item 2): presets are complete specs, every task name is checked
against the installed lm-eval before a model is loaded, HellaSwag is read as acc_norm."""

from __future__ import annotations

import json

import pytest

from megavlm.eval import cli, tasks
from megavlm.eval.api import EvalSpec, eval_spec, evaluate
from megavlm.eval.runner import CheckpointModel, EvalError
from megavlm.eval.stable_score import PRESETS
from megavlm.eval.text import text_accuracies


@pytest.fixture
def no_loading(monkeypatch):
    """Loading a model is a test failure: the checks must come first."""
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the spec was checked")
    monkeypatch.setattr(CheckpointModel, "load", classmethod(lambda cls, *a, **k: refuse()))


class _Suite:  # a vision suite that is never reached
    def text(self, *a, **k):
        raise AssertionError("suite used")

    def vision(self, *a, **k):
        raise AssertionError("suite used")


def test_unknown_task_fails_before_loading(no_loading, tmp_path):
    spec = EvalSpec(suite=_Suite(), text_tasks=["hellaswag", "bigbench_cs_algorithms"])
    with pytest.raises(EvalError, match=r"does not know the task\(s\) \['bigbench_cs_algorithms'\].*"
                                        r"bigbench_cs_algorithms_multiple_choice"):
        evaluate(tmp_path / "no-checkpoint", spec)
    # the vision side: an unknown paper-suite task, before loading
    with pytest.raises(EvalError, match=r"unknown paper-suite task\(s\) \['vqa3'\]"):
        evaluate(tmp_path, EvalSpec(suite=_Suite(), text_tasks=["copa"], paper_root=tmp_path, paper_tasks=["vqa3"]))


def test_cli_unknown_task_fails_before_loading(no_loading, tmp_path, capsys):
    assert cli.main(["text", "--checkpoint", str(tmp_path / "nowhere"), "--tasks", "copa,hellaswag_x"]) == 2
    assert "does not know the task(s) ['hellaswag_x']" in capsys.readouterr().err
    assert cli.main(["all", "--checkpoint", str(tmp_path / "nowhere"), "--suite", "paper", "--data-root",
                     str(tmp_path), "--tasks", "arc_easyy"]) == 2
    assert "arc_easyy" in capsys.readouterr().err


def test_task_without_chance_fails_before_loading(no_loading, tmp_path):
    # lm-eval knows arc_challenge, the chance tables do not: an error now, not after the run
    with pytest.raises(EvalError, match=r"no chance level for task\(s\) \['arc_challenge'\]"):
        evaluate(tmp_path, EvalSpec(suite=_Suite(), text_tasks=["arc_challenge"]))


def test_metric_lm_eval_does_not_report_is_refused(no_loading, tmp_path):
    with pytest.raises(EvalError, match=r"copa reports \['acc'\], not the metric 'acc_norm'"):
        evaluate(tmp_path, EvalSpec(suite=_Suite(), text_tasks=["copa"], text_metrics={"copa": "acc_norm"}))


def test_hellaswag_reads_acc_norm():
    # the results dict as lm-eval 0.4.13's simple_evaluate returns it for these tasks
    res = {"results": {"hellaswag": {"alias": "hellaswag", "acc,none": 0.41, "acc_stderr,none": "N/A",
                                     "acc_norm,none": 0.53, "acc_norm_stderr,none": "N/A"},
                       "arc_easy": {"acc,none": 0.6, "acc_norm,none": 0.55}}}
    assert text_accuracies(res) == {"hellaswag": 0.53, "arc_easy": 0.6}
    assert text_accuracies(res, {"arc_easy": "acc_norm"})["arc_easy"] == 0.55
    with pytest.raises(EvalError, match="hellaswag: no metric 'acc_norm'"):
        text_accuracies({"results": {"hellaswag": {"acc,none": 0.4}}})
    # and lm-eval's own HellaSwag config lists acc_norm; every preset's metric is one its task lists
    assert "acc_norm" in tasks.task_metrics("hellaswag")
    for p in tasks.SPEC_PRESETS.values():
        tasks.check_text_tasks([t.name for t in p.text], metrics=p.metrics)
        assert p.metrics["hellaswag"] == "acc_norm"


def test_presets_are_complete_specs(tmp_path):
    for name in ("paper-table7", "paper-table8"):
        s = eval_spec(name, data_root=tmp_path)
        assert s.chance == name
        assert s.text_tasks == list(PRESETS[name].text_tasks)
        assert s.paper_tasks == list(PRESETS[name].vision_tasks) and s.paper_root == str(tmp_path)
        assert s.text_metrics["hellaswag"] == "acc_norm"
        tasks.check_spec(s)
    assert "bigbench_cs_algorithms" not in PRESETS["paper-table7"].text_tasks  # not in lm-eval 0.4.13
    with pytest.raises(EvalError, match="paper-table8 scores the paper's vision suite: give its data root"):
        eval_spec("paper-table8")
    # the preset's text with the offline vision suite
    s = eval_spec("paper-table7", suite=_Suite(), vision_suite="offline")
    assert s.paper_root is None and len(s.text_tasks) == 8


def test_cli_chance_preset_is_the_spec(tmp_path):
    args = cli.build_parser().parse_args(["all", "--checkpoint", "x", "--chance", "paper-table7",
                                          "--data-root", str(tmp_path)])
    s = cli.spec_of(args)
    assert s.text_tasks == list(PRESETS["paper-table7"].text_tasks) and s.paper_root == str(tmp_path)
    args = cli.build_parser().parse_args(["all", "--checkpoint", "x", "--spec", "paper-table8",
                                          "--data-root", str(tmp_path), "--paper-tasks", "pope,gqa"])
    s = cli.spec_of(args)
    assert s.chance == "paper-table8" and s.paper_tasks == ["pope", "gqa"]
    args = cli.build_parser().parse_args(["all", "--checkpoint", "x", "--chance", "paper-table7"])
    with pytest.raises(EvalError, match="give its data root"):
        cli.spec_of(args)


def test_spec_file_and_recipe_section(tmp_path):
    f = tmp_path / "spec.yaml"
    f.write_text("preset: paper-table8\ntext_tasks: [hellaswag, 'copa:acc']\n"
                 "vision: {suite: paper, data_root: " + str(tmp_path) + ", tasks: [pope]}\n")
    s = eval_spec(f)
    assert (s.text_tasks, s.text_metrics, s.paper_tasks, s.chance) == (
        ["hellaswag", "copa"], {"hellaswag": "acc_norm", "copa": "acc"}, ["pope"], "paper-table8")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: {hidden_size: 8}\neval:\n  text_tasks: [piqa]\n  vision: {suite: offline}\n")
    s = eval_spec(recipe, suite=_Suite())
    assert s.text_tasks == ["piqa"] and s.paper_root is None and s.chance == "appendix-e"
    j = tmp_path / "spec.json"
    j.write_text(json.dumps({"text_tasks": ["piqa"], "visoin": {}}))
    with pytest.raises(EvalError, match=r"unknown key\(s\) \['visoin'\]"):
        eval_spec(j, suite=_Suite())
    with pytest.raises(EvalError, match="neither an evaluation preset"):
        eval_spec(tmp_path / "nope.yaml")


def test_recipe_eval_section_reaches_the_sweep_scoring(tiny_checkpoint, tmp_path, no_loading):
    import shutil

    import yaml

    from megavlm.config import ConfigError, load_config
    from megavlm.experiment import scoring

    # a recipe's eval: section is part of the run config (not identity), strict like the rest
    recipe = tmp_path / "r.yaml"
    recipe.write_text("eval:\n  preset: paper-table7\n  vision: {suite: paper, data_root: /bench}\n")
    run = load_config(recipe)
    assert run.eval.preset == "paper-table7" and run.eval.vision.data_root == "/bench" and run.eval.is_set()
    recipe.write_text("eval:\n  vision: {sutie: paper}\n")
    with pytest.raises(ConfigError, match="eval.vision.sutie"):
        load_config(recipe)
    # the checkpoint's config.yaml keeps it; scoring reads it and checks its tasks before loading
    ck = tmp_path / "run" / "text" / "checkpoints" / tiny_checkpoint.name
    shutil.copytree(tiny_checkpoint, ck)
    cfg = yaml.safe_load((ck / "config.yaml").read_text())
    assert tasks.recorded_spec(ck) is None  # the default section: the offline suites
    cfg["eval"] = {"text_tasks": ["copa", "no_such_task"], "vision": {"suite": "offline"}}
    (ck / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert tasks.recorded_spec(ck) == {"text_tasks": ["copa", "no_such_task"], "vision": {"suite": "offline"}}
    with pytest.raises(scoring.ScoringError, match=r"does not know the task\(s\) \['no_such_task'\]"):
        scoring.evaluate_checkpoint(ck, tmp_path / "ev", demo_root=str(tmp_path / "demo"))
