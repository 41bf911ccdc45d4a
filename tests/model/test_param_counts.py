"""Parameter counts of the recipes, read off the actual megatron-core modules.

Each recipe's model is built at full depth on the ``meta`` device (no memory, no init: the
counts come from the real megatron modules and our layer spec, not from a formula) on the
session's one-process parallel context with tp = pp = 1 (counts do not depend on the layout).
The language model excludes the projector; DCLM's published figure also excludes the qk-norm
gains, so DCLM-1B must be exactly 1,439,795,200 without them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megavlm.config import load_config
from megavlm.model.reference import num_parameters

DCLM_1B = 1_439_795_200
CONFIGS = Path(__file__).resolve().parents[2] / "launch" / "configs"


def _counts(recipe: str) -> dict[str, int]:
    from megavlm.model.specs import transformer_config
    from megavlm.model.build import build_chunks

    run = load_config(CONFIGS / f"{recipe}.yaml",
                      ["parallel.tp=1", "parallel.pp=1", "parallel.vpp=null",
                       "parallel.sequence_parallel=false", "parallel.recompute=none"])
    tc = transformer_config(run.model, run.parallel, dtype=torch.float32, batch_p2p_comm=False)
    with torch.device("meta"):
        (chunk,), _ = build_chunks(tc, run.model, None)
    assert all(p.is_meta for p in chunk.parameters())
    lm = qk = proj = 0
    for name, p in chunk.named_parameters():
        if name.startswith("projector."):
            proj += p.numel()
        elif "q_layernorm" in name or "k_layernorm" in name:
            qk += p.numel()
        else:
            lm += p.numel()
    return {"lm_without_qk_gains": lm, "qk_gains": qk, "projector": proj,
            "layers": run.model.num_layers, "closed_form": num_parameters(run.model, qk_norm_gains=False)}


@pytest.mark.parametrize("recipe", ["dclm-79m", "dclm-1b", "dclm-7b"])
def test_recipe_parameter_counts(parallel1, recipe):
    c = _counts(recipe)
    table = (f"{recipe}: LM {c['lm_without_qk_gains']:,} without qk-norm gains "
             f"(+{c['qk_gains']:,} gains = {c['lm_without_qk_gains'] + c['qk_gains']:,}), "
             f"projector {c['projector']:,}")
    print(table)
    # the modules agree with the closed form of the architecture (a missing or extra tensor fails)
    assert c["lm_without_qk_gains"] == c["closed_form"], table
    hidden = {"dclm-79m": 512, "dclm-1b": 2048, "dclm-7b": 4096}[recipe]
    assert c["qk_gains"] == 2 * hidden * c["layers"], table  # one full-width gain for q and for k
    if recipe == "dclm-1b":
        assert c["lm_without_qk_gains"] == DCLM_1B, table
