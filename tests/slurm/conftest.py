"""The ``slurm_cluster`` fixture: a real one-node SLURM cluster (tests/slurm/cluster.py) for the
whole session, skipped with the reason where munge/slurm are not installed or we are not root
(MEGAVLM_REQUIRE_SLURM=1, set by .ci/run, makes that a failure); and a small prepared data root + two-stage recipe the jobs train (no demo corpus needed)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.data.conftest import corpus, sp_model, tok  # noqa: F401  (fixtures)
from tests.slurm.cluster import SlurmCluster, unavailable
from tests.synthetic import tiny_run


@pytest.fixture(scope="session")
def slurm_cluster():
    why = unavailable()
    if why:
        if os.environ.get("MEGAVLM_REQUIRE_SLURM") == "1":  # .ci/run installed it: never skip there
            pytest.fail(f"MEGAVLM_REQUIRE_SLURM=1 but {why}")
        pytest.skip(why)
    # a short path under /tmp: munge's socket path must fit in sun_path (108 bytes)
    folder = Path(tempfile.mkdtemp(prefix="megavlm-slurm-"))
    cluster = SlurmCluster(folder).start()
    try:
        yield cluster
    finally:
        cluster.stop()
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


def write_recipe(path: Path, data_root: Path, run_dir: Path, steps: int = 4, **train) -> Path:
    """A two-stage (text, then image-text) recipe over the prepared ``corpus`` fixture."""
    raw = tiny_run(str(run_dir), steps=steps, layers=2)
    raw["model"]["vision"] = {"embed_dim": 8, "num_patches": 4}
    raw["model"]["vocab_size"] = 512  # the corpus tokenizer has 400 ids
    raw["stages"][0]["checkpoint_fractions"] = [0.5, 1.0]
    raw["stages"][1]["init"]["fraction"] = 0.5  # 'continue' from 1.0 is refused by the config
    raw["train"].update(**train)
    raw.setdefault("logging", {})["log_every"] = 1
    raw["data"] = {"root": str(data_root), "build": "none", "tokenizer": "tokenizer.model"}
    path.write_text(yaml.safe_dump(raw))
    return path
