"""One process of a multi-process engine test (launched by tests/dist.py through torchrun).

Reads a JSON spec: the raw run config, which stages to run, optional early stop / fault, and
which steps' full gradients to record. Rank 0 writes {losses, grads, weights} with torch.save.
"""

from __future__ import annotations

import json
import sys
import warnings

warnings.filterwarnings("ignore")


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

    run_stages(run, par, loader_factory=synthetic.factory(run), log=lambda s: None,
               only=spec.get("only"), stop_after=spec.get("stop_after"), fault=spec.get("fault"),
               observer=observer)
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
        torch.save({"grads": grads, "weights": weights}, spec["out"])
    par.destroy()


if __name__ == "__main__":
    main(sys.argv[1])
