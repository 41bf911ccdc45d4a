"""Stopping on request (megavlm.train.preemption): a SIGTERM that reaches one rank of a
2-process gloo run mid-stage makes every rank finish the step, save a complete checkpoint at it
and exit 75; re-running resumes and reproduces the uninterrupted run's losses exactly. The time
budget does the same without a signal, and a signal that lands inside a checkpoint write lets
the write finish (the newest checkpoint is whole) before the run stops."""

from __future__ import annotations

import json
import os
import re
import signal

import pytest

from megavlm.config import load_config
from megavlm.train import checkpoint as ckpt
from megavlm.train import loop
from megavlm.train.preemption import EXIT_PREEMPTED, Preempted
from megavlm.train.plan import plan_run
from tests import synthetic
from tests.dist import launch, losses


def _raw(run_dir, **train) -> dict:
    raw = synthetic.tiny_run(str(run_dir), steps=4, layers=2)
    raw["stages"] = raw["stages"][:1]
    raw["stages"][0]["checkpoint_fractions"] = [0.5, 1.0]  # steps 2 and 4
    raw["train"].update(train)
    return raw


def _trainer(parallel1, tmp_path, **train):
    run = load_config(raw=_raw(tmp_path / "run", **train))
    st = run.stages[0]
    sched = plan_run(run)[st.name]
    (tmp_path / "run").mkdir()
    logs: list[str] = []
    return run, loop.StageTrainer(run, sched, parallel1, synthetic.factory(run), log=logs.append), logs


def _complete(run) -> list[str]:
    d = ckpt.stage_dir(run.run_dir, "text")
    names = sorted(p.name for p in d.iterdir())
    for n in names:
        if not n.startswith(".tmp-"):
            ckpt.require_complete(d / n)
    return names


def test_time_budget_saves_and_exits_75(parallel1, tmp_path, monkeypatch):
    exit_file = tmp_path / "exit-code"
    monkeypatch.setenv("MEGAVLM_EXIT_FILE", str(exit_file))
    run, trainer, logs = _trainer(parallel1, tmp_path, max_wall_minutes=1e-6)  # spent before step 1 ends
    with pytest.raises(Preempted) as e:
        trainer.train()
    assert e.value.code == EXIT_PREEMPTED == 75 and e.value.step == 1
    assert _complete(run) == ["step_0000001"]
    assert json.loads((ckpt.stage_dir(run.run_dir, "text") / "step_0000001" / "meta.json").read_text())["step"] == 1
    assert exit_file.read_text().strip() == "75"
    assert "[text] stopped at step 1 on time budget (preemption.max_wall_minutes)" in logs[-1]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers are restored afterwards


def test_signal_during_a_checkpoint_write_lets_it_finish(parallel1, tmp_path, monkeypatch):
    real = ckpt.publish

    def signal_midway(tmp, path):  # step 2's files are written, its rename not yet done
        if path.name == "step_0000002":
            os.kill(os.getpid(), signal.SIGTERM)
            assert tmp.is_dir() and not path.exists()
        return real(tmp, path)

    monkeypatch.setattr(ckpt, "publish", signal_midway)
    run, trainer, logs = _trainer(parallel1, tmp_path)
    with pytest.raises(Preempted) as e:
        trainer.train()
    # the write in progress completed and published; the run stopped at the next step's agreement
    assert e.value.step == 3 and e.value.reason == "stop signal"
    assert _complete(run) == ["step_0000002", "step_0000003"]  # both whole, no .tmp- left
    lines = [json.loads(x) for x in open(run.run_dir + "/metrics.jsonl").read().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]


@pytest.mark.slow  # three 2-process runs (~90 s on 2 shared cores)
@pytest.mark.distributed
def test_sigterm_on_one_rank_stops_all_saves_and_resumes_exactly(tmp_path, monkeypatch):
    full = launch(2, {"config": _raw(tmp_path / "full" / "run"), "only": ["text"]}, tmp_path / "full")
    exit_file = tmp_path / "exit-code"
    monkeypatch.setenv("MEGAVLM_EXIT_FILE", str(exit_file))
    cfg = _raw(tmp_path / "run")
    stopped = launch(2, {"config": cfg, "only": ["text"], "fault": "sigterm_after_step:2@1"}, tmp_path,
                     expect_rc=EXIT_PREEMPTED)
    # both workers exited 75 (torchrun reports each worker's own code); rank 0 wrote it for launchers
    assert len(re.findall(r"exitcode\s*:\s*75\b", stopped["stderr"])) >= 1, stopped["stderr"][-3000:]
    assert exit_file.read_text().strip() == "75"
    ckdir = tmp_path / "run" / "text" / "checkpoints"
    assert sorted(p.name for p in ckdir.iterdir()) == ["step_0000002", "step_0000003"]
    ckpt.require_complete(ckdir / "step_0000003")
    assert {p.name for p in (ckdir / "step_0000003" / "loader").iterdir()} == {"dp0.json", "dp1.json"}
    assert len(losses(stopped, "text")) == 3
    monkeypatch.delenv("MEGAVLM_EXIT_FILE")
    resumed = launch(2, {"config": cfg, "only": ["text"]}, tmp_path)
    assert losses(resumed, "text") == losses(full, "text")  # bitwise on CPU
    assert f"[text] resumed from {ckdir / 'step_0000003'} at step 3/4" in resumed["log"], resumed["log"]


def test_signal_between_stages_stops_the_next_stage_at_its_first_step(parallel1, tmp_path, monkeypatch):
    """run_stages keeps the handlers installed between stages: a SIGUSR1 after the text stage
    finished (before the image stage built anything) neither kills the process nor is lost — the
    image stage saves at its step 1 and stops with exit 75 (what launch/slurm.sbatch requeues)."""
    from megavlm.train import stages

    monkeypatch.setenv("MEGAVLM_EXIT_FILE", str(tmp_path / "exit-code"))
    raw = synthetic.tiny_run(str(tmp_path / "run"), steps=2, layers=2)
    run = load_config(raw=raw)
    real = loop.StageTrainer.train

    def train_then_signal(self, *a, **kw):
        out = real(self, *a, **kw)
        if self.stage.name == "text":  # between the stages: no stage's handler is installed
            os.kill(os.getpid(), signal.SIGUSR1)
        return out

    monkeypatch.setattr(loop.StageTrainer, "train", train_then_signal)
    with pytest.raises(Preempted) as e:
        stages.run_stages(run, parallel1, synthetic.factory(run), log=lambda s: None, check=False)
    assert (e.value.stage, e.value.step, e.value.reason) == ("image", 1, "stop signal")
    assert (ckpt.stage_dir(run.run_dir, "image") / "step_0000001" / "meta.json").is_file()
    assert (tmp_path / "exit-code").read_text().strip() == "75"
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the run-wide handlers are gone too
