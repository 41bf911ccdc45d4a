"""Own question files and the checkpoint's prompt template (issue 14 item 6): the template recorded
at training is the one evaluation asks with (unless --prompt, which the results name); own tasks
take either spelling of a store prefix and join `eval all`; misuse fails before anything loads;
a folder that is not a checkpoint says so, and run/stage folders resolve to their newest one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from megavlm.config import DEFAULT_PROMPT_TEMPLATE
from megavlm.eval import cli, vision
from megavlm.eval.api import ExtraTask, resolve_prompt
from megavlm.eval.runner import CheckpointModel, EvalError
from tests.eval.test_vision import write_store


def _questions(tmp_path):
    q = tmp_path / "qs.jsonl"
    q.write_text(json.dumps({"question_id": 1, "image": "a.png", "question": "What?", "answers": ["a"]}) + "\n")
    return q


def test_template_is_recorded_in_the_checkpoint_and_used(tiny_checkpoint, tmp_path, monkeypatch):
    raw = yaml.safe_load((tiny_checkpoint / "config.yaml").read_text())
    assert raw["data"]["prompt_template"] == DEFAULT_PROMPT_TEMPLATE  # written at training
    own = tmp_path / "step_0000003"
    shutil.copytree(tiny_checkpoint, own)
    raw["data"]["prompt_template"] = "\nQ: {question}"
    (own / "config.yaml").write_text(yaml.safe_dump(raw))
    model = CheckpointModel.load(own, batch_size=2)
    prompt = resolve_prompt(model)  # None: the checkpoint's own
    assert (prompt.template, prompt.source) == ("\nQ: {question}", "checkpoint (data.prompt_template)")
    assert not hasattr(model, "prompt_template")  # the template is an argument, never the model's attribute
    seen = []
    real = vision.generate_answers
    monkeypatch.setattr(vision, "generate_answers", lambda m, qs, b, r, n, template: seen.append(template)
                        or real(m, qs, b, r, n, template))
    bank = vision.ImageBank(write_store(tmp_path / "imgs.embeds", ["a.png"]))
    qs = vision.read_generic(_questions(tmp_path))
    vision.score_task("generic", model, qs, bank, "qs", max_new_tokens=2, template=prompt.template)
    assert seen == ["\nQ: {question}"]
    with pytest.raises(EvalError, match="must contain"):
        resolve_prompt(model, "no placeholder")
    del raw["data"]["prompt_template"]  # a checkpoint older than the field: the default, said so
    (own / "config.yaml").write_text(yaml.safe_dump(raw))
    old = resolve_prompt(CheckpointModel.load(own, batch_size=2))
    assert old.template == DEFAULT_PROMPT_TEMPLATE and old.source.startswith("default")


def test_own_task_with_either_store_spelling_and_prompt_override(tiny_checkpoint, tmp_path, capsys):
    write_store(tmp_path / "imgs.embeds", ["a.png"])
    rc = cli.main(["vision", "--checkpoint", str(tiny_checkpoint), "--task", "generic", "--questions",
                   str(_questions(tmp_path)), "--embeds", str(tmp_path / "imgs"), "--prompt", "\\n{question}?",
                   "--max-new-tokens", "2"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["generic"]["n"] == 1
    assert out["prompt"] == {"template": "\n{question}?", "source": "--prompt"}
    assert out["checkpoint"] == str(tiny_checkpoint.resolve())  # every result names its checkpoint


def test_misuse_fails_before_loading(tmp_path, capsys):
    q = _questions(tmp_path)
    assert cli.main(["vision", "--checkpoint", str(tmp_path / "nowhere"), "--questions", str(q)]) == 2
    assert "--questions/--embeds need --task" in capsys.readouterr().err
    assert cli.main(["all", "--checkpoint", str(tmp_path), "--extra-task", "generic:only-two"]) == 2
    assert "expected TASK:QUESTIONS:EMBEDS" in capsys.readouterr().err
    assert cli.main(["vision", "--checkpoint", str(tmp_path)]) == 2
    assert "not a checkpoint" in capsys.readouterr().err


def test_extra_task_specs():
    assert cli.extra_tasks(["generic:data/q.jsonl:data/own"]) == [ExtraTask("generic", "data/q.jsonl", "data/own",
                                                                             "generic:q", 0.0)]
    assert cli.extra_tasks(["generic:q.jsonl:own:0.1"])[0].chance == 0.1
    with pytest.raises(EvalError, match="CHANCE must be a number in"):
        cli.extra_tasks(["generic:q.jsonl:own:half"])
    with pytest.raises(EvalError, match="unknown task 'vqav2'"):
        cli.extra_tasks(["vqav2:q.json:data/own"])
    with pytest.raises(EvalError, match="chance must be a number in"):
        ExtraTask("generic", "q.jsonl", "own", chance=1.5)


def test_extra_task_files_are_checked_before_loading(tmp_path, capsys):
    q = _questions(tmp_path)
    assert cli.main(["all", "--checkpoint", str(tmp_path / "nowhere"), "--extra-task", f"generic:{q}:{tmp_path / 'none'}"]) == 2
    err = capsys.readouterr().err
    assert "no embedding store there (--extra-task generic:qs)" in err and "metadata" not in err
    assert cli.main(["all", "--checkpoint", str(tmp_path / "nowhere"), "--extra-task", f"generic:{tmp_path / 'x.jsonl'}:e"]) == 2
    assert "x.jsonl: no such question file" in capsys.readouterr().err


@pytest.mark.parametrize("factory", ["demo", None])
def test_eval_all_extra_task_writes_a_report_without_a_demo_root(tiny_checkpoint, tmp_path, monkeypatch, capsys,
                                                                 factory):
    """As ``megavlm eval`` runs it (the demo's offline suites handed in, no demo corpus: they are
    skipped with a notice) and as megavlm.eval.cli.main alone (no offline suite at all)."""
    from megavlm.config import DataConfig
    from megavlm.demo.suites import OfflineSuite

    monkeypatch.setattr(DataConfig, "root", str(tmp_path / "no-demo"))  # no demo corpus anywhere
    write_store(tmp_path / "imgs.embeds", ["a.png"])
    q = _questions(tmp_path)
    rc = cli.main(["all", "--checkpoint", str(tiny_checkpoint), "--extra-task", f"generic:{q}:{tmp_path / 'imgs'}:0.25",
                   "--out-dir", str(tmp_path / "rep")], offline=OfflineSuite.default if factory else None)
    out = capsys.readouterr()
    assert rc == 0, out.err
    if factory:
        assert "offline suites skipped" in out.err and "megavlm prepare demo" in out.err
    rep = json.loads(out.out)
    assert rep["own"]["generic:qs"]["chance"] == 0.25 and rep["own"]["generic:qs"]["n"] == 1
    assert rep["checkpoint"] == str(tiny_checkpoint.resolve()) and rep["vision"] == {} and rep["text"] == {}
    j, m, answers = map(Path, rep["files"])
    assert json.loads(j.read_text())["own"]["generic:qs"]["chance"] == 0.25
    assert "| own | generic:qs |" in m.read_text()
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [(r["task"], r["qid"]) for r in rows] == [("generic:qs", "1")] and "prediction" in rows[0]
    assert answers.name == j.stem + ".answers.jsonl"


def test_evaluate_with_own_tasks_alone(tiny_checkpoint, tmp_path):
    """The library: own tasks alone need no suite; they are reported apart from the stable score."""
    from megavlm.eval.api import EvalSpec, evaluate

    write_store(tmp_path / "imgs.embeds", ["a.png"])
    spec = EvalSpec(extra_tasks=[ExtraTask("generic", str(_questions(tmp_path)), str(tmp_path / "imgs"))],
                    max_new_tokens=2, out_dir=tmp_path / "rep", log_to_sinks=False)
    rep = evaluate(tiny_checkpoint, spec)
    assert rep.data["own"]["generic:qs"]["chance"] == 0.0 and rep.accuracies("vision") == {}
    assert rep.stable_score == {"text": None, "vision": None} and len(rep.files) == 3
    assert [r.task for r in rep.results] == ["generic:qs"]
    with pytest.raises(EvalError, match="no embedding store there"):
        evaluate(tmp_path / "nowhere", EvalSpec(extra_tasks=[ExtraTask("generic", str(_questions(tmp_path)),
                                                                       str(tmp_path / "none"))]))


def test_lm_eval_git_lookup_is_quiet_outside_a_checkout(tmp_path, monkeypatch, capfd):
    pytest.importorskip("lm_eval")
    import lm_eval.evaluator as ev

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ev, "get_git_commit_hash", ev.get_git_commit_hash)  # restored after the test
    from megavlm.eval import text

    text._quiet_git()
    ev.get_git_commit_hash()
    assert "fatal" not in capfd.readouterr().err


def test_latest_shortcut_resolves_run_and_stage_folders(tiny_checkpoint, tmp_path, capsys):
    from megavlm.checkpoint_format import resolve_checkpoint

    run = tiny_checkpoint.parents[2]
    for p in (run, run / "latest", run / "text", run / "text" / "latest", run / "text" / "checkpoints",
              tiny_checkpoint):
        assert resolve_checkpoint(p) == tiny_checkpoint, p
