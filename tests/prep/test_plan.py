"""`megavlm prepare --plan`: images, tokens and bytes per set and the free disk, before any work."""
from __future__ import annotations

from megavlm.config import load_config
from megavlm.prep.plan import plan
from megavlm.prepare import main


def test_paper_recipe_plan_matches_the_papers_arithmetic():
    run = load_config("launch/configs/paper-1b.yaml")
    sets = {s.kind: s for s in plan(run)}
    caps = sets["captions"]
    # 28B x 10 % / (729 + SEP + EOD + 20 caption tokens) images; 729 x 1152 bf16 each (the issue: ~3.8M, ~6.4 TB)
    assert 3.6e6 < caps.images < 3.9e6
    assert 6.0e12 < caps.bytes < 6.6e12
    assert sets["text"].tokens == int(2.8e10 * 0.9)
    assert sets["instructions"].conversations == 665000
    fp8 = {s.kind: s for s in plan(run, dtype="float8_e4m3")}["captions"]
    assert 0.49 < fp8.bytes / caps.bytes < 0.52


def test_cli_prints_the_plan_and_says_when_the_disk_is_short(tmp_path, capsys):
    (tmp_path / "a.tar").write_bytes(b"x" * 2048)
    rc = main(["--plan", "--config", "launch/configs/paper-1b.yaml", f"data.root={tmp_path}",
               "--inputs", f"captions={tmp_path}/*.tar"])
    out = capsys.readouterr().out
    assert "captions" in out and "free disk under" in out and "inputs captions: 1 files, 2.0 KB" in out
    assert (rc == 3) == ("NOT ENOUGH" in out)
    rc = main(["--plan", "--config", "launch/configs/demo.yaml", f"data.root={tmp_path}"])
    assert rc == 0, capsys.readouterr().out
