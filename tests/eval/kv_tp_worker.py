"""One rank of the TP = 2 KV-cache test (tests/eval/test_kv_cache.py), launched by torchrun.

    worker.py CHECKPOINT OUT.json

Builds the checkpoint's model at tensor-parallel size 2 over gloo (each rank holds half the
heads, so its KV cache holds half the heads), loads the weights at that layout, and generates the
test's case with and without the cache; rank 0 writes both and the layout to OUT.json.
"""
from __future__ import annotations

import json
import sys
import warnings

warnings.filterwarnings("ignore")


def main(checkpoint: str, out: str) -> None:
    import torch

    from megavlm.checkpoint_format import CONFIG, load_model_weights, tokenizer_file
    from megavlm.config import load_config
    from megavlm.data.tokenizer import load_tokenizer
    from megavlm.eval.runner import CheckpointModel
    from megavlm.model.build import build_model
    from megavlm.parallel.state import Parallel
    from pathlib import Path
    from tests.eval.test_kv_cache import tp_case

    path = Path(checkpoint)
    run = load_config(path / CONFIG)
    run.parallel.tp, run.parallel.pp, run.parallel.vpp, run.parallel.sequence_parallel = 2, 1, None, False
    par = Parallel.initialize(run.parallel, run.seed)
    chunks, _ = build_model(run, par, torch.float32)
    load_model_weights(path, chunks)
    for c in chunks:
        c.eval()
    model = CheckpointModel(chunks, run, load_tokenizer(tokenizer_file(path)), path, batch_size=4, parallel=par)
    case = tp_case(model)
    kw = dict(max_new_tokens=case["max_new_tokens"])
    cached = model.generate_ids(case["prompts"], case["images"], cache=True, **kw)
    uncached = model.generate_ids(case["prompts"], case["images"], cache=False, **kw)
    att = model.model.decoder.layers[0].self_attention
    if par.rank == 0:
        tmp = out + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"tp": par.tp, "heads_per_rank": att.num_attention_heads_per_partition,
                       "cached": cached, "uncached": uncached}, f)
        import os

        os.replace(tmp, out)
    par.destroy()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
