"""Without the binaries the SLURM tests are skipped with a reason that says what to install."""

from __future__ import annotations

import pytest

from tests.slurm import cluster

pytestmark = pytest.mark.slurm


def test_missing_binaries_are_named(monkeypatch):
    monkeypatch.setattr(cluster, "BINARIES", ("slurmd", "no-such-slurm-binary"))
    why = cluster.unavailable()
    assert "no-such-slurm-binary" in why and "apt-get install slurmctld slurmd slurm-client munge" in why


def test_cluster_answers(slurm_cluster):
    p = slurm_cluster.cmd("sinfo", "-h", "-o", "%P %a %D")
    assert p.stdout.split() == ["test*", "up", "1"]
    assert set(slurm_cluster.procs) == {"munged", "slurmctld", "slurmd"}
    assert all(proc.poll() is None for proc in slurm_cluster.procs.values())


def test_a_second_cluster_starts_and_stops_by_pid(slurm_cluster):
    """Another cluster beside the session's (own ports, own folder) stops all its daemons."""
    import shutil
    import tempfile
    from pathlib import Path

    import psutil

    folder = Path(tempfile.mkdtemp(prefix="megavlm-slurm-"))
    try:
        c = cluster.SlurmCluster(folder).start()
        pids = [p.pid for p in c.procs.values()]
        assert len(pids) == 3 and all(psutil.pid_exists(pid) for pid in pids)
        c.stop()
        assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                       for pid in pids)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
