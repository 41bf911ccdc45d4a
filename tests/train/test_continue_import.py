"""continue from an imported checkpoint (init.path): a stated source schedule, or the one our
checkpoints record in meta.json; and the bad inputs, each one clear error before training."""

from __future__ import annotations

import json
import math

import pytest

from megavlm.config import ConfigError, load_config
from megavlm.train.plan import describe_run, plan_run
from megavlm.train.schedule import StageSchedule, continued, cosine, lr_from_description, recorded

SRC = {"kind": "cosine", "peak": 1e-2, "final": 1e-5, "warmup_steps": 50, "steps": 1000, "fraction": 0.8}


def _raw(schedule, init=None, tokens=64 * 8 * 256):
    return {"stages": [{"name": "img", "tokens": tokens, "init": init or {"path": "/nonexistent/ckpt"},
                        "schedule": schedule, "checkpoint_fractions": [1.0]}]}


def test_stated_source_continues_its_cosine():
    run = load_config(raw=_raw({"kind": "continue", "source": SRC}))
    T = describe_run(run)["stages"][0]["steps"]
    st = describe_run(run)["stages"][0]
    assert st["schedule"]["source"] == SRC and st["schedule"]["source_fraction"] == 0.8
    src = lambda t: cosine(t, 1000, 50, 1e-2, 1e-5)  # noqa: E731
    assert st["lr"][0][1] == pytest.approx(src(800))
    assert st["lr"][-1][1] == pytest.approx(1e-5)
    s = plan_run(run, steps={"img": T})["img"].schedule
    assert s.lr(17) == pytest.approx(continued(17, T, src, 1000, 0.8))


def test_source_read_from_our_checkpoint_meta(tmp_path):
    # what the trainer writes: recorded(schedule) of a continue-from-stage, nested
    text = StageSchedule("cosine", 1000, lambda t: cosine(t, 1000, 50, 1e-2, 1e-5), 1e-2, 1e-5, 50, None, None)
    img = StageSchedule("continue", 200, lambda t: continued(t, 200, text.lr, 1000, 0.6), None, 1e-5, None,
                        "text", 0.6, parent=text)
    desc = recorded(img)
    assert desc["source"] == {"kind": "cosine", "peak": 1e-2, "final": 1e-5, "warmup_steps": 50,
                              "source_stage": None, "source_fraction": None, "steps": 1000, "fraction": 0.6}
    rebuilt = lr_from_description(desc)
    for t in (0, 37, 150, 199):
        assert rebuilt(t) == pytest.approx(img.lr(t))
    ck = tmp_path / "step_0000150"
    ck.mkdir()
    (ck / "meta.json").write_text(json.dumps({"stage": "image", "step": 150, "steps": 200, "fractions": [],
                                              "schedule": desc}))
    run = load_config(raw=_raw({"kind": "continue"}, init={"path": str(ck)}))
    st = describe_run(run)["stages"][0]
    assert st["schedule"]["source"]["fraction"] == pytest.approx(0.75)
    assert st["schedule"]["source"]["from"].endswith("meta.json")
    assert st["lr"][0][1] == pytest.approx(img.lr(150))  # picks up where that stage stood
    assert st["lr"][-1][1] == pytest.approx(img.lr(200))  # and finishes that stage's schedule
    assert st["lr"][-1][1] == pytest.approx(1e-5, rel=0.05)


def test_continue_without_any_source_is_one_error():
    with pytest.raises(ConfigError, match="needs init.stage and init.fraction .* or init.path with schedule.source"):
        load_config(raw={"stages": [{"name": "a", "tokens": 1, "schedule": {"kind": "continue"}}]})


@pytest.mark.parametrize("frac,msg", [(0.0, r"must be in \(0, 1\)"), (1.5, r"must be in \(0, 1\)"),
                                      (-0.2, r"must be in \(0, 1\)"), (1.0, "use schedule.kind=rewarm")])
def test_source_fraction_outside_open_interval(frac, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(raw=_raw({"kind": "continue", "source": {**SRC, "fraction": frac}}))


def test_incomplete_source_names_what_is_missing():
    with pytest.raises(ConfigError, match="schedule.source needs warmup_steps, steps"):
        load_config(raw=_raw({"kind": "continue", "source": {"peak": 1e-2, "final": 1e-5, "fraction": 0.5}}))


def test_continue_from_fraction_one_suggests_rewarm(tmp_path):
    raw = {"stages": [{"name": "t", "tokens": 100},
                      {"name": "i", "tokens": 100, "init": {"stage": "t", "fraction": 1.0},
                       "schedule": {"kind": "continue"}}]}
    with pytest.raises(ConfigError, match="fraction 1.0.*rewarm"):
        load_config(raw=raw)
    # one of our checkpoints at the end of its schedule: caught at plan time
    ck = tmp_path / "final"
    ck.mkdir()
    (ck / "meta.json").write_text(json.dumps({"stage": "t", "step": 1000, "steps": 1000,
                                              "schedule": {**SRC, "source_stage": None}}))
    run = load_config(raw=_raw({"kind": "continue"}, init={"path": str(ck)}))
    with pytest.raises(ConfigError, match="fraction 1.0.*rewarm"):
        describe_run(run)


def test_imported_checkpoint_without_schedule_asks_for_source(tmp_path):
    ck = tmp_path / "imported"
    ck.mkdir()
    # what tools/convert_openlm.py writes: no schedule, steps 0
    (ck / "meta.json").write_text(json.dumps({"stage": "import", "step": 0, "steps": 0, "fractions": []}))
    run = load_config(raw=_raw({"kind": "continue"}, init={"path": str(ck)}))
    with pytest.raises(ConfigError, match="records no schedule.*schedule.source"):
        describe_run(run)
    run = load_config(raw=_raw({"kind": "continue"}, init={"path": str(tmp_path / "missing")}))
    with pytest.raises(ConfigError, match="meta.json not found"):
        describe_run(run)
    with pytest.raises(ConfigError, match="source is for init.path"):
        load_config(raw={"stages": [{"name": "t", "tokens": 100},
                                    {"name": "i", "tokens": 100, "init": {"stage": "t", "fraction": 1.0},
                                     "schedule": {"kind": "continue", "source": SRC}}]})


def test_cli_reports_bad_source_as_config_error(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-m", "megavlm", "plan", "--config", str(root / "launch/configs/paper-1b.yaml"),
                          "stages.0.schedule.source.fraction=1.0"], capture_output=True, text=True, cwd=root)
    assert out.returncode == 2 and "rewarm" in out.stderr and "Traceback" not in out.stderr
