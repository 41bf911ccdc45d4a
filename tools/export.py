#!/usr/bin/env python
"""Export a megavlm checkpoint's language model and projector as safetensors + config JSON.

    python tools/export.py --checkpoint runs/dclm-1b/sft/checkpoints/step_0001907 --out export/ \
        [--dtype bf16]

Writes ``OUT/model.safetensors`` — the language model as an open_lm ``Transformer`` state dict
(open_lm's parameter names and rotary ``inv_freq`` buffers: it loads with ``strict=True``; the
same layout tools/convert_openlm.py reads, so an export re-imports exactly) — ``OUT/projector.safetensors``
(``projector.fc1/fc2`` weights and biases) and ``OUT/config.json`` (architecture, files, key
layout, open_lm model config, the megavlm model config). Runs in one process at any saved layout (the checkpoint is read at TP=PP=1); the
tokenizer stored in the checkpoint is copied next to them when there is one.

Check (on by default): the exported language model is loaded into the independent plain-PyTorch
forward (megavlm.model.reference) and its logits compared with the megatron model's.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megavlm.helpformat import HelpFormatter  # noqa: E402

import torch  # noqa: E402

from megavlm.model import openlm_io  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def export(checkpoint: Path, out: Path, parallel, *, dtype: torch.dtype = torch.float32,
           check: bool = True, log=print) -> dict:
    """Export on a one-process parallel context; returns {tensors, check}."""
    from megavlm import checkpoint_format as ckpt
    from megavlm.config import load_config
    from megavlm.model.build import build_model
    from megavlm.model.export import full_tensors

    checkpoint = Path(checkpoint)
    ckpt.require_complete(checkpoint, config=True)
    run = load_config(checkpoint / ckpt.CONFIG)
    run.parallel.tp = run.parallel.pp = 1
    run.parallel.vpp, run.parallel.sequence_parallel = None, False
    run.precision.fp8 = "none"
    chunks, _ = build_model(run, parallel, torch.float32, backend="local")
    ckpt.load_model_weights(checkpoint, chunks)
    full = full_tensors(chunks)
    tensors = openlm_io.export_tensors(full, run.model, dtype)
    openlm_io.write_export(tensors, openlm_io.export_config(run), out,
                           metadata={"source": checkpoint, "dtype": str(dtype).replace("torch.", "")})
    try:
        shutil.copy2(ckpt.tokenizer_file(checkpoint), out / ckpt.tokenizer_file(checkpoint).name)
    except ckpt.CheckpointError:
        pass
    log(f"wrote {out / 'model.safetensors'} ({len(tensors)} tensors, {dtype}) and {out / 'config.json'}")
    result = None
    if check:
        written, _ = openlm_io.read_state_dict(out / "model.safetensors")  # the file, not our dict
        lm = {k: v.float() for k, v in written.items() if not k.startswith("projector.")}
        if dtype != torch.float32:  # compare like with like: the megatron side at the exported precision
            openlm_io.place_full_tensors(chunks, {k: v.to(dtype).float() for k, v in full.items()}, 0, 1)
        result = openlm_io.check_logits(chunks, lm, run.model, tp_group=None, tp_size=1, pp_size=1)
        log(f"check: exported weights vs megatron model, logits relative L2 {result['rel']:.2e}")
    return {"tensors": sorted(tensors), "check": result}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--checkpoint", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--no-check", action="store_true")
    args = ap.parse_args(argv)

    from megavlm.config import ParallelConfig
    from megavlm.parallel.state import Parallel
    from megavlm.checkpoint_format import CheckpointError

    parallel = Parallel.initialize(ParallelConfig(), 0)
    try:
        export(args.checkpoint, args.out, parallel, dtype=DTYPES[args.dtype], check=not args.no_check)
    except (CheckpointError, openlm_io.ConversionError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    finally:
        parallel.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
