"""``python -m tests.slurm.entry train --config C ...``: ``megavlm train``, held still at one point
of the first attempt so a test can signal it there (MEGAVLM_ENTRY=tests.slurm.entry in
launch/slurm.sbatch's environment). Nothing else changes: the signal path, the checkpoint, exit
75 and the requeue are the real ones.

MEGAVLM_TEST_HOLD=STAGE:STEP  rank 0 waits after that step's forward/backward (mid-stage), or
MEGAVLM_TEST_HOLD=after:STAGE after that stage finished (between stages), until a stop signal
has arrived (at most 300 s), having written MEGAVLM_TEST_HELD (a file) so the test knows when
to signal. A requeued attempt (SLURM_RESTART_COUNT > 0) is not held.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def _wait_for_stop(marker: str) -> None:
    from megavlm.train import preemption

    Path(marker).write_text(f"{os.getpid()}\n")
    t0 = time.time()
    while time.time() - t0 < 300 and not any(s.received for s in preemption._active):
        time.sleep(0.05)


def install(hold: str, marker: str) -> None:
    from megavlm.train import loop

    real = loop.StageTrainer.train
    where, _, what = hold.partition(":")

    def train(self, stop_after=None, observer=None):
        rank0 = self.parallel.rank == 0

        def held(stage, step, model):
            if observer is not None:
                observer(stage, step, model)
            if rank0 and stage == where and step == int(what):
                _wait_for_stop(marker)

        out = real(self, stop_after=stop_after, observer=held if where != "after" else observer)
        if where == "after" and self.stage.name == what and rank0 and not out.skipped:
            _wait_for_stop(marker)
        return out

    loop.StageTrainer.train = train


def main() -> int:
    hold, marker = os.environ.get("MEGAVLM_TEST_HOLD"), os.environ.get("MEGAVLM_TEST_HELD")
    if hold and marker and int(os.environ.get("SLURM_RESTART_COUNT") or 0) == 0:
        install(hold, marker)
    from megavlm.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
