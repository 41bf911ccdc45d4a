"""docs/paper-data.md's rehearsal block runs as written: tiny inputs in the published formats ->
parallel prepare + merge -> disk plan -> the three stages of paper-rehearsal.yaml -> evaluation of the
instruction-tuned checkpoint on questions about the prepared images."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def rehearsal_block() -> str:
    text = (ROOT / "docs/paper-data.md").read_text()
    m = re.search(r"<!-- rehearsal:begin -->\n```bash\n(.*?)```\n<!-- rehearsal:end -->", text, re.S)
    assert m, "the rehearsal block is missing from docs/paper-data.md"
    return m.group(1)


def test_the_block_uses_the_real_tools():
    block = rehearsal_block()
    for needle in ("tools/preprocess_text.py", "--merge", "tools/encode_images.py", "--image-root",
                   "tools/preprocess_conversations.py", "prepare --plan", "megavlm train", "megavlm eval vision"):
        assert needle in block


@pytest.mark.slow  # ~5 min on the shared 2-core machine (three trainings, several interpreters)
def test_rehearsal_runs_end_to_end(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE") and not k.startswith("SLURM")}
    env.update(R=str(tmp_path / "r"), PYTHONPATH=str(ROOT), PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    r = subprocess.run(["bash", "-c", rehearsal_block()], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "[sft] step 5/5" in r.stdout + r.stderr
    from megavlm.data.indexed import EmbeddingStore

    assert EmbeddingStore(tmp_path / "r/data/captions.embeds").meta.source["caption_choice"] == "hash"
    import json

    rep = json.loads((tmp_path / "r/eval/llava-questions.json").read_text())
    assert rep["generic"]["n"] == 24 and 0.0 <= rep["generic"]["accuracy"] <= 1.0  # all 24 images scored
    assert len(rep["generic"]["predictions"]) == 24 and rep["checkpoint"].startswith(str(tmp_path))
