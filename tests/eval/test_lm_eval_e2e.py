"""lm-eval end to end, offline: a local YAML task scored by the harness on the tiny checkpoint."""
from __future__ import annotations

import json

import pytest
import torch

from megavlm.demo import suites
from megavlm.eval import cli
from megavlm.eval.runner import EvalError

DOCS = [
    {"q": "The cat runs near the", "choices": [" house.", " blue.", " sleeps."], "label": 0},
    {"q": "One two three", "choices": [" four.", " dog.", " under."], "label": 0},
    {"q": "Red blue", "choices": [" river.", " green.", " five."], "label": 1},
    {"q": "The bird eats", "choices": [" fish.", " old.", " two."], "label": 0},
    {"q": "Small large", "choices": [" quick.", " tree.", " happy."], "label": 2},
]
YAML = """task: tiny_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{q}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def local_task(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    data = d / "tiny_local_mc.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in DOCS))
    (d / "tiny_local_mc.yaml").write_text(YAML.format(data=data))
    return d


def expected_acc(model) -> float:
    """Accuracy from direct log-likelihoods: argmax over choices of log P(choice | question)."""
    right = 0
    for doc in DOCS:
        scores = []
        for c in doc["choices"]:
            ctx, cont = model.encode(doc["q"]), model.encode(doc["q"] + c)[len(model.encode(doc["q"])):]
            ids = ctx + cont
            with torch.no_grad():
                logits = model.model.logits(model.model(torch.tensor([ids]), torch.arange(len(ids))[None], None))
            lp = torch.log_softmax(logits[0].float(), -1)
            scores.append(sum(float(lp[t - 1, ids[t]]) for t in range(len(ctx), len(ids))))
        right += int(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
    return right / len(DOCS)


def test_simple_evaluate_by_model_name(tiny_checkpoint, loaded, local_task, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    import megavlm.eval  # noqa: F401  registers "megavlm"

    tm = TaskManager(include_path=str(local_task), include_defaults=False)
    out = lm_eval.simple_evaluate(model="megavlm", model_args=f"checkpoint={tiny_checkpoint},batch_size=4",
                                  tasks=["tiny_local_mc"], task_manager=tm, bootstrap_iters=0)
    acc = out["results"]["tiny_local_mc"]["acc,none"]
    assert acc == pytest.approx(expected_acc(loaded))


def test_cli_text_and_unknown_task(tiny_checkpoint, local_task, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "res.json"
    rc = cli.main(["text", "--checkpoint", str(tiny_checkpoint), "--tasks", "tiny_local_mc",
                   "--include-path", str(local_task), "--limit", "3", "--batch-size", "2",
                   "--output-path", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["results"]["tiny_local_mc"]["acc,none"] in (0.0, 1 / 3, 2 / 3, 1.0)
    assert res["n-samples"]["tiny_local_mc"]["effective"] == 3
    capsys.readouterr()
    rc = cli.main(["text", "--checkpoint", str(tiny_checkpoint), "--tasks", "tiny_local_mc,no_such_task",
                   "--include-path", str(local_task)])
    err = capsys.readouterr().err
    assert rc == 2 and "lm-eval does not know the task(s) ['no_such_task']" in err


def test_unknown_task_error(loaded, local_task):
    with pytest.raises(EvalError, match="does not know"):
        suites.run_text(loaded, ["nope"], local_task, include_defaults=False)
