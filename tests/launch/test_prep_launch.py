"""The preparation launch examples run as written: the SLURM array tokenization script as 2 array
tasks (+ the merge) equals one worker; the 8-GPU encode script under torchrun with 2 CPU workers."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.data.conftest import make_text, sp_model  # noqa: F401
from tests.prep.test_readers_text import write_formats

ROOT = Path(__file__).resolve().parents[2]


def _env(**kw):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE") and not k.startswith("SLURM")}
    env.update(PYTHONPATH=str(ROOT), PYTHON=sys.executable, **kw)
    return env


@pytest.mark.slow  # four fresh interpreters each import megatron-core: ~110 s on the shared 2-core machine
def test_slurm_array_tokenization_then_merge_equals_one_worker(tmp_path, sp_model, make_text):
    d = tmp_path / "in"
    d.mkdir()
    write_formats(d, make_text(40, seed=2))
    script = ROOT / "launch/prep/tokenize-array.sbatch"
    for task in (7, 8):  # --array=7-8
        subprocess.run(["bash", str(script), str(d / "*"), str(tmp_path / "arr"), str(sp_model)], check=True,
                       env=_env(SLURM_ARRAY_TASK_ID=str(task), SLURM_ARRAY_TASK_MIN="7", SLURM_ARRAY_TASK_COUNT="2",
                                MEGAVLM_ROOT=str(ROOT)), capture_output=True)
    subprocess.run([sys.executable, "tools/preprocess_text.py", "--merge", "--output", str(tmp_path / "arr")],
                   check=True, cwd=ROOT, env=_env(), capture_output=True)
    subprocess.run([sys.executable, "tools/preprocess_text.py", "--input", str(d / "*"), "--output",
                    str(tmp_path / "one"), "--tokenizer", str(sp_model), "--no-progress"],
                   check=True, cwd=ROOT, env=_env(), capture_output=True)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"arr{ext}").read_bytes() == (tmp_path / f"one{ext}").read_bytes()


@pytest.mark.slow  # two workers each import transformers and build the encoder (~40 s here)
def test_torchrun_encode_script_two_cpu_workers(tmp_path, sp_model):
    from tests.prep.test_readers_webdataset import write_shard
    from megavlm.data.indexed import EmbeddingStore
    from transformers import SiglipVisionConfig, SiglipVisionModel

    SiglipVisionModel(SiglipVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=32, patch_size=8)).save_pretrained(tmp_path / "m")
    for s in range(3):
        write_shard(tmp_path / f"s-{s}.tar", 10 * s, 3)
    r = subprocess.run(["bash", str(ROOT / "launch/prep/encode-8gpu.sh"), str(tmp_path / "s-{0..2}.tar"),
                        str(tmp_path / "caps"), str(sp_model)], env=_env(NPROC="2", ENCODER=f"siglip:{tmp_path / 'm'}"),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    store = EmbeddingStore(tmp_path / "caps.embeds")
    assert len(store) == 9 and store.meta.source["caption_choice"] == "hash"
