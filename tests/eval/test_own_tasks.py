"""Own question files and the checkpoint's prompt template (issue 14 item 6): the template recorded
at training is the one evaluation asks with (unless --prompt, which the results name); own tasks
take either spelling of a store prefix and join `eval all`; misuse fails before anything loads;
a folder that is not a checkpoint says so, and run/stage folders resolve to their newest one."""

from __future__ import annotations

import json
import shutil

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
                                                                             "generic:q")]
    with pytest.raises(EvalError, match="unknown task 'vqav2'"):
        cli.extra_tasks(["vqav2:q.json:data/own"])


def test_latest_shortcut_resolves_run_and_stage_folders(tiny_checkpoint, tmp_path, capsys):
    from megavlm.checkpoint_format import resolve_checkpoint

    run = tiny_checkpoint.parents[2]
    for p in (run, run / "latest", run / "text", run / "text" / "latest", run / "text" / "checkpoints",
              tiny_checkpoint):
        assert resolve_checkpoint(p) == tiny_checkpoint, p
