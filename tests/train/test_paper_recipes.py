"""The paper recipes plan with the paper's numbers (steps and LRs at start and end), checked
against arithmetic written out here (keh2025 Table 2 lines 504-508, Appendix D lines 527-536)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from megavlm.config import load_config
from megavlm.train.plan import describe_run

ROOT = Path(__file__).resolve().parents[2]
CFG = ROOT / "launch" / "configs"


def _cos(t, T, W, peak, final):
    return peak * t / W if t < W else final + (peak - final) * 0.5 * (1 + math.cos(math.pi * (t - W) / (T - W)))


def test_paper_1b_plan():
    p = describe_run(load_config(CFG / "paper-1b.yaml"))
    image, sft = p["stages"]
    # DCLM-1B's schedule: 4.3e12 tokens / (256 * 2048 = 524,288 per step) = 8,201,599.12 -> 8,201,600
    src_steps = 8_201_600
    assert src_steps == math.ceil(4.3e12 / (256 * 2048))
    assert image["schedule"]["source"] == {"kind": "cosine", "peak": 1e-2, "final": 1e-5,
                                           "warmup_steps": 5000, "steps": src_steps, "fraction": 0.8}
    # 28e9 real tokens, data absent: ceil(28e9 / (256 * 1024 = 262,144)) = ceil(106,811.52) = 106,812
    assert image["steps"] == 106_812 and image["tokens_per_step"] == 262_144
    assert image["estimated"] is True and image["budget"] == "real"
    # start: DCLM's LR at 80 %: t = 0.8 * 8,201,600 = 6,561,280 of the cosine after 5000 warmup steps
    # 1e-5 + (1e-2 - 1e-5) * 0.5 * (1 + cos(pi * 6,556,280 / 8,196,600)) = 9.6509e-4
    start = 1e-5 + (1e-2 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 6_556_280 / 8_196_600))
    assert start == pytest.approx(9.6509e-4, rel=1e-4)
    assert image["lr"][0][1] == pytest.approx(start, rel=1e-9)
    assert image["lr"][-1][1] == pytest.approx(1e-5, rel=1e-9)  # ends at DCLM's final LR
    # SFT: 4 epochs x 665,000 examples / 256 per step = 10,390.6 -> 10,391 steps; warmup ceil(519.55) = 520
    assert sft["steps"] == 10_391 and sft["schedule"]["warmup_steps"] == 520
    assert sft["budget"] == "epochs-examples" and sft["examples_per_epoch"] == 665_000
    assert sft["lr"][0][1] == 0.0
    # last step t = 10,390: 3e-4 * 0.5 * (1 + cos(pi * 9870 / 9871)) = 7.597e-12
    assert sft["lr"][-1][1] == pytest.approx(3e-4 * 0.5 * (1 + math.cos(math.pi * 9870 / 9871)), rel=1e-9)
    run = load_config(CFG / "paper-1b.yaml")
    assert run.stage("sft").adam_beta2 == 0.95 and run.stage("sft").schedule.peak == 3e-4
    assert run.stage("image").seq_length == 1024 and run.stage("image").mixture.captions == 0.1


def test_paper_79m_plan():
    p = describe_run(load_config(CFG / "paper-79m.yaml"))
    text, image, sft = p["stages"]
    # 237e9 / (512 * 2048 = 1,048,576) = 226,020.8 -> 226,021 steps, warmup 400, peak 3e-3
    assert text["steps"] == 226_021 and text["schedule"]["warmup_steps"] == 400
    assert text["lr"][0][1] == 0.0 and text["lr"][-1][1] == pytest.approx(_cos(226_020, 226_021, 400, 3e-3, 3e-5))
    assert max(lr for _, lr in text["lr"]) <= 3e-3
    # image: 1.6e9 / (512 * 1024) = 3051.76 -> 3052 steps (estimated without data), from the 80 %
    # text checkpoint at round(0.8 * 226,021) = 180,817: starts at the text cosine's LR at
    # 0.8 * 226,021 = 180,816.8 and ends at its final 3e-5
    assert image["steps"] == 3052 and image["estimated"] is True
    assert image["lr"][0][1] == pytest.approx(_cos(0.8 * 226_021, 226_021, 400, 3e-3, 3e-5))
    assert image["lr"][-1][1] == pytest.approx(3e-5)
    # sft at the paper's fine-tuning batch (App. D: 256 examples), the text stages at 512:
    # ceil(4 * 665,000 / 256) = ceil(10,390.625) = 10,391 steps, warmup ceil(0.05 * 10,391) = 520
    assert sft["steps"] == math.ceil(4 * 665_000 / 256) == 10_391
    assert sft["global_batch_size"] == 256 and sft["batch_unit"] == "examples"
    assert sft["schedule"]["warmup_steps"] == 520
    assert text["global_batch_size"] == image["global_batch_size"] == 512
    assert text["tokens_per_step"] == 512 * 2048 and image["tokens_per_step"] == 512 * 1024
    # weight decay: no stage sets one, so the image stage decays as the text stage (App. B)
    assert text["weight_decay"] == image["weight_decay"] == sft["weight_decay"] == 0.1


def test_plan_cli_shows_source_and_estimates():
    out = subprocess.run([sys.executable, "-m", "megavlm", "plan", "--config", str(CFG / "paper-1b.yaml"), "--json"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    image = json.loads(out.stdout)["stages"][0]
    assert image["schedule"]["source"]["fraction"] == 0.8 and image["estimated"] is True
    assert "data absent" in image["budget_note"]


def test_dclm_recipes_hold_the_paper_budgets():
    r1 = load_config(CFG / "dclm-1b.yaml")
    assert r1.stage("text").tokens == int(4.3e12) and r1.stage("image").tokens == int(2.8e10)
    assert r1.stage("image").seq_length == 1024 and r1.stage("image").budget == "real"
    assert r1.stage("sft").epochs == 4 and r1.stage("sft").batch_unit == "examples"
    r79 = load_config(CFG / "dclm-79m.yaml")
    assert r79.stage("text").tokens == int(2.37e11) and r79.stage("image").tokens == int(1.6e9)
