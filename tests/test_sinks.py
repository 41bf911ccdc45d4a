"""megavlm.sinks on a tiny run (one process): TensorBoard events read back with
TensorBoard's own EventAccumulator and a W&B offline run read back from its .wandb record log
hold every step's loss, LR, grad norm, tokens/s, image-text ratio, padding fraction and skip
flag; evaluation scores of a report land in the checkpoint's run's sinks; asking for an absent
package is a one-line error before training."""

from __future__ import annotations

import glob
import json
import struct

import pytest

from megavlm.config import ConfigError, load_config
from megavlm.train import checkpoint as ckpt
from megavlm import sinks
from megavlm.train import loop
from megavlm.train.plan import plan_run
from tests import synthetic

STEPS = 3


def _run(tmp_path, **train):
    raw = synthetic.tiny_run(str(tmp_path / "run"), steps=STEPS, layers=2)
    raw["stages"] = raw["stages"][:1]
    raw["stages"][0].update(mixture={"text": 0.5, "captions": 0.5}, checkpoint_fractions=[1.0])
    raw["train"].update(train)
    return load_config(raw=raw)


def _wandb_history(wdir) -> list[dict]:
    """History rows of the offline run under ``wdir``: the .wandb file is a log of 32 KiB blocks of
    (crc32, length, type) framed protobuf Records after a 7-byte header."""
    from wandb.proto import wandb_internal_pb2 as pb

    (f,) = glob.glob(f"{wdir}/wandb/offline-run-*/run-*.wandb")
    data, pos, buf, rows = open(f, "rb").read(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and n == 0:
            break
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # FULL or LAST fragment
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            if rec.HasField("history"):
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return rows


@pytest.fixture(scope="module")
def logged(parallel1, tmp_path_factory):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    tmp = tmp_path_factory.mktemp("sinks")
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_SILENT", "true")
    try:
        run = _run(tmp, tensorboard_dir="tb", wandb={"project": "megavlm-test", "mode": "offline", "dir": str(tmp / "wb")})
        (tmp / "run").mkdir()
        st = run.stages[0]
        sched = plan_run(run)[st.name]
        loop.StageTrainer(run, sched, parallel1, synthetic.factory(run), log=lambda s: None).train()
    finally:
        mp.undo()
    lines = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    return {"run": run, "lines": lines, "dir": tmp}


def _tb(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def test_tensorboard_events_hold_every_step(logged):
    acc = _tb(logged["dir"] / "run" / "tb")
    tags = set(acc.Tags()["scalars"])
    for k in ("loss", "lr", "grad_norm", "tokens_per_s", "image_text_ratio", "padding_fraction", "skipped"):
        assert f"text/{k}" in tags, tags
    for k in ("loss", "lr", "grad_norm", "image_text_ratio", "padding_fraction"):
        ev = acc.Scalars(f"text/{k}")
        assert [e.step for e in ev] == [1, 2, 3]
        assert [e.value for e in ev] == pytest.approx([m[k] for m in logged["lines"]], rel=1e-6)
    assert [e.value for e in acc.Scalars("text/skipped")] == [0.0, 0.0, 0.0]


def test_wandb_offline_run_holds_every_step(logged):
    rows = _wandb_history(logged["dir"] / "wb")
    assert [r["text/step"] for r in rows] == [1, 2, 3]
    for k in ("loss", "lr", "grad_norm", "tokens_per_s", "padding_fraction"):
        assert [r[f"text/{k}"] for r in rows] == pytest.approx([m[k] for m in logged["lines"]], rel=1e-12)


def test_eval_scores_go_to_the_runs_sinks(logged, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    info = ckpt.latest(logged["run"].run_dir, "text")
    report = {"checkpoint": str(info.path), "stage": "text", "step": info.step,
              "text": {"arc_easy": {"accuracy": 0.4, "chance": 0.25}},
              "vision": {"demo-shapes": {"accuracy": 0.75, "chance": 0.5, "n": 10}},
              "stable_score": {"text": 0.2, "vision": None}}
    assert sinks.log_eval_report(report)
    acc = _tb(logged["dir"] / "run" / "tb")
    ev = acc.Scalars("eval/text/vision/demo-shapes")
    assert [(e.step, e.value) for e in ev] == [(STEPS, 0.75)]
    assert acc.Scalars("eval/text/text/arc_easy")[0].value == pytest.approx(0.4)
    assert acc.Scalars("eval/text/stable_score/text")[0].value == pytest.approx(0.2)


def test_absent_package_is_a_one_line_error_before_training(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("tensorboard", "wandb") else real(name, *a))
    with pytest.raises(ConfigError, match=r"logging.tensorboard_dir is set but the tensorboard package is not installed"):
        sinks.check_available(_run(tmp_path, tensorboard_dir="tb"))
    with pytest.raises(ConfigError, match=r"logging.wandb is set but the wandb package is not installed"):
        sinks.check_available(_run(tmp_path, wandb={"mode": "offline"}))
    sinks.check_available(_run(tmp_path, wandb={"mode": "disabled"}))  # disabled needs nothing


def test_wandb_config_is_typed():
    with pytest.raises(ConfigError, match=r"logging.wandb.mode: 'cloud' is not one of"):
        load_config(raw={"train": {"wandb": {"mode": "cloud"}}, "stages": [{"name": "t", "tokens": 10}]})


def test_progress_bars_only_on_a_terminal(monkeypatch):
    import io

    from megavlm.progress import bars_enabled

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("MEGAVLM_PROGRESS", raising=False)
    assert bars_enabled(Tty()) and not bars_enabled(io.StringIO())  # a log file gets no bars
    monkeypatch.setenv("MEGAVLM_PROGRESS", "0")
    assert not bars_enabled(Tty())
    monkeypatch.setenv("MEGAVLM_PROGRESS", "1")
    assert bars_enabled(io.StringIO())
