"""One process of a multi-process engine test (launched by tests/dist.py through torchrun).

Reads a JSON spec: the raw run config, which stages to run, optional early stop / fault, and
which steps' full gradients to record. Rank 0 writes {grads, weights, log} with torch.save.

Faults are injected here, on the test side, by patching two seams of the library (production
code has no fault parameters):

* ``exit_after_step:K`` — the process dies (``os._exit(17)``: no cleanup, no checkpoint) right
  after step K's metrics line is written (``MetricsLog.write``);
* ``exit_in_checkpoint:K`` — it dies after step K's checkpoint is fully written under
  ``.tmp-step_…`` and before ``checkpoint.publish`` renames it into place.
* ``sigterm_after_step:K@R`` — rank R alone sends itself SIGTERM right after step K's metrics
  line (a preemption notice that reached one rank); the run itself must stop cleanly.
"""

from __future__ import annotations

import json
import sys
import warnings

warnings.filterwarnings("ignore")


FAULT_EXIT = 17


def inject_fault(fault: str) -> None:
    """Patch the seam named by ``fault`` (see the module docstring) to kill this process."""
    import os

    from megavlm.train import checkpoint, loop

    kind, _, at = fault.partition(":")
    at, _, only_rank = at.partition("@")
    k = int(at)
    if kind == "sigterm_after_step":
        import signal

        import torch.distributed as dist

        write = loop.MetricsLog.write

        def write_then_signal(self, rec):
            write(self, rec)
            if rec["step"] == k and dist.get_rank() == int(only_rank or 0):
                os.kill(os.getpid(), signal.SIGTERM)

        loop.MetricsLog.write = write_then_signal
    elif kind == "exit_after_step":
        write = loop.MetricsLog.write

        def write_then_die(self, rec):
            write(self, rec)
            if rec["step"] == k:
                os._exit(FAULT_EXIT)

        loop.MetricsLog.write = write_then_die
    elif kind == "exit_in_checkpoint":
        def die_before_publish(tmp, path):
            if path.name == f"step_{k:07d}":
                os._exit(FAULT_EXIT)
            return publish(tmp, path)

        publish = checkpoint.publish
        checkpoint.publish = die_before_publish
    else:
        raise ValueError(f"unknown fault {fault!r}")


def main(spec_path: str) -> None:
    import torch

    from megavlm.config import load_config
    from megavlm.model.export import full_tensors
    from megavlm.parallel.state import Parallel
    from megavlm.train.stages import run_stages
    from tests import synthetic

    spec = json.loads(open(spec_path).read())
    run = load_config(raw=spec["config"])
    par = Parallel.initialize(run.parallel, run.seed)
    grads: dict[int, dict] = {}
    record = set(spec.get("grad_steps", []))

    def observer(stage, step, model):
        if f"{stage}:{step}" in record:
            grads[f"{stage}:{step}"] = full_tensors(model, tp_group=par.tp_group, pp_group=par.pp_group, grads=True)

    if spec.get("fault"):
        inject_fault(spec["fault"])
    log: list[str] = []
    run_stages(run, par, loader_factory=synthetic.factory(run), log=log.append,
               only=spec.get("only"), stop_after=spec.get("stop_after"), observer=observer,
               force_config=spec.get("force_config", False))
    weights = None
    if spec.get("weights_of"):
        from megavlm.train import checkpoint as ckpt
        from megavlm.train.loop import build_model, model_dtype

        chunks, _ = build_model(run, par, model_dtype(run))
        wanted = spec["weights_of"]
        weights = {}
        for stage in [wanted] if isinstance(wanted, str) else wanted:
            info = ckpt.latest(run.run_dir, stage)
            ckpt.load(info.path, chunks, None)
            weights[stage] = full_tensors(chunks, tp_group=par.tp_group, pp_group=par.pp_group)
        if isinstance(wanted, str):
            weights = weights[wanted]
    if par.rank == 0:
        torch.save({"grads": grads, "weights": weights, "log": log}, spec["out"])
    par.destroy()


if __name__ == "__main__":
    main(sys.argv[1])
