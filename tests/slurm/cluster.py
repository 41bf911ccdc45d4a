"""A real one-node SLURM cluster for tests: munged, slurmctld and slurmd started in the foreground
from a config generated in a temp folder (state, spool, logs, sockets and pid files all there;
ports on loopback picked free), stopped by their own pids.

Clients find it through ``SLURM_CONF`` (set in :attr:`SlurmCluster.env`); jobs inherit that
environment (sbatch's default ``--export=ALL``), so ``scontrol requeue`` inside a batch script
talks to this cluster too. Needs root (SlurmUser=root; slurmd starts jobs as the submitting user).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "squeue")
SEARCH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin"])


def which(name: str) -> Optional[str]:
    return shutil.which(name, path=SEARCH)


def unavailable() -> Optional[str]:
    """Why a cluster cannot start here (None when it can)."""
    missing = [b for b in BINARIES if which(b) is None]
    if missing:
        return (f"SLURM tests need {', '.join(missing)} (Debian: apt-get install slurmctld slurmd "
                f"slurm-client munge; .ci/run installs them)")
    if os.geteuid() != 0:
        return "SLURM tests need root (the test cluster runs SlurmUser=root and slurmd as root)"
    return None


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SlurmCluster:
    NODE = "megavlm-test-node"
    PARTITION = "test"

    def __init__(self, folder: Path, cpus: int = 8):
        self.dir = Path(folder)
        self.cpus = cpus
        self.conf = self.dir / "slurm.conf"
        self.socket = self.dir / "munge" / "munge.socket"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, SLURM_CONF=str(self.conf),
                        PATH=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))

    # -- start / stop --------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        try:
            self._start_munge()
            self._write_config()
            self._spawn("slurmctld", [which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            self._wait(lambda: self._ok(["scontrol", "ping"], "UP"), timeout, "slurmctld to answer")
            self._spawn("slurmd", [which("slurmd"), "-D", "-f", str(self.conf), "-N", self.NODE])
            self._wait(self._node_idle, timeout, f"node {self.NODE} to become idle")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Cancel what is left, then stop slurmd, slurmctld and munged by their pids."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            subprocess.run([which("scancel"), "--full", "--partition", self.PARTITION], env=self.env,
                           capture_output=True, timeout=30)
            time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.pop(name, None)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        self._stop_job_leftovers()

    def _stop_job_leftovers(self) -> None:
        """slurmstepd processes of this cluster that outlived slurmd (they detach from it)."""
        import psutil

        for p in psutil.process_iter(["pid", "name", "environ"]):
            try:
                if p.info["name"] == "slurmstepd" and (p.info["environ"] or {}).get("SLURM_CONF") == str(self.conf):
                    p.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass

    # -- pieces --------------------------------------------------------------------------------

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = (self.dir / f"{name}.out").open("ab")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            stdin=subprocess.DEVNULL)
        log.close()

    def _start_munge(self) -> None:
        d = self.socket.parent
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o755)
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._spawn("munged", [which("munged"), "-F", "-f", f"--socket={self.socket}", f"--key-file={key}",
                               f"--pid-file={d / 'munged.pid'}", f"--log-file={d / 'munged.log'}",
                               f"--seed-file={d / 'munged.seed'}"])
        self._wait(lambda: self.socket.exists(), 20, "munged's socket")

    def _write_config(self) -> None:
        ctld_port, slurmd_port = free_ports(2)
        for sub in ("state", "spool", "log"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text("\n".join([
            "ClusterName=megavlmtest",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire: a requeued job waits this long + 1 s before it may start again (default 120)
            f"AuthInfo=socket={self.socket},cred_expire=10",
            f"StateSaveLocation={self.dir / 'state'}",
            f"SlurmdSpoolDir={self.dir / 'spool'}",
            f"SlurmctldPidFile={self.dir / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.dir / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.dir / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={self.dir / 'log' / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "JobRequeue=1",
            "MpiDefault=none",
            "ReturnToService=2",
            "SchedulerType=sched/builtin",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SlurmdParameters=config_overrides",  # the node's CPUs as written, whatever the VM has
            "MinJobAge=600",  # finished jobs stay visible to scontrol for the tests
            "KillWait=10",
            "InactiveLimit=0",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=60",
            f"NodeName={self.NODE} NodeAddr=127.0.0.1 NodeHostname={socket.gethostname()} "
            f"CPUs={self.cpus} State=UNKNOWN",
            f"PartitionName={self.PARTITION} Nodes={self.NODE} Default=YES MaxTime=INFINITE State=UP",
        ]) + "\n")

    def _wait(self, ready, timeout: float, what: str) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited {p.returncode} while waiting for {what}:\n{self.logs()}")
            if ready():
                return
            time.sleep(0.3)
        raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}:\n{self.logs()}")

    def _ok(self, cmd: list[str], needle: str) -> bool:
        p = subprocess.run([which(cmd[0]), *cmd[1:]], env=self.env, capture_output=True, text=True, timeout=20)
        return p.returncode == 0 and needle in p.stdout

    def _node_idle(self) -> bool:
        p = subprocess.run([which("sinfo"), "-h", "-N", "-o", "%T"], env=self.env, capture_output=True,
                           text=True, timeout=20)
        return p.returncode == 0 and p.stdout.strip().startswith("idle")

    def logs(self, tail: int = 3000) -> str:
        out = []
        for f in [*(self.dir / "log").glob("*.log"), *self.dir.glob("*.out"), self.socket.parent / "munged.log"]:
            if f.exists():
                out.append(f"--- {f.name}\n{f.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    # -- client helpers ------------------------------------------------------------------------

    def cmd(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        p = subprocess.run([which(args[0]), *args[1:]], env=self.env, capture_output=True, text=True,
                           timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {p.returncode}: {p.stderr.strip()}")
        return p

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job -o``'s fields of one job ({} once it is gone)."""
        p = self.cmd("scontrol", "show", "job", "-o", str(job_id), check=False)
        if p.returncode != 0:
            return {}
        fields = {}
        for tok in p.stdout.split():
            k, _, v = tok.partition("=")
            fields[k] = v
        return fields

    def wait_job(self, job_id: str, timeout: float, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                              "NODE_FAIL", "OUT_OF_MEMORY")) -> dict:
        t0 = time.time()
        info = {}
        while time.time() - t0 < timeout:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f} s:\n{self.logs()}")
