#!/usr/bin/env python
"""Import an OpenLM / DCLM state dict (open_lm key names) as a megavlm checkpoint at any TP/PP.

    # one process (TP=PP=1)
    python tools/convert_openlm.py --input dclm-1b.pt --config launch/configs/dclm-1b.yaml \
        --out ckpt/dclm-1b-import
    # directly at TP=2 (one process per model-parallel rank)
    torchrun --nproc_per_node=2 tools/convert_openlm.py --input model.safetensors \
        --config launch/configs/dclm-1b.yaml --out ckpt/dclm-1b-tp2 parallel.tp=2

Input: a .pt/.bin (bare state dict or open_lm's ``{"state_dict": ...}``, DDP/compile/HF prefixes
stripped) or a .safetensors file. The model shape comes from the recipe (validated against every
tensor); rotary ``inv_freq`` buffers, when the file has them, must match the recipe's
``model.rope_base`` (a mismatch is refused, naming both); the projector, which OpenLM does not
have, keeps its seeded initialisation. Each rank
builds its part of the model at the recipe's layout, places its shards, and the checkpoint is
written through megatron dist_checkpointing (megavlm.train.checkpoint.save), so it also loads at
any other layout. Start a stage from it with ``init: {path: OUT}``.

``--verify CKPT`` (with --input and --config) only checks an existing checkpoint at the recipe's
layout, e.g. an import written at TP=1 loaded under torchrun at TP=2.

Check (on by default): the checkpoint is read back into a freshly built model; its gathered
tensors must equal the state dict exactly, and at pipeline size 1 its logits must match the
independent plain-PyTorch forward (megavlm.model.reference) loaded straight from the state dict.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megavlm.helpformat import HelpFormatter  # noqa: E402

import torch  # noqa: E402

from megavlm.config import ConfigError, RunConfig, load_config  # noqa: E402
from megavlm.model import openlm_io  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def convert(run: RunConfig, parallel, input_path: Path, out: Path, *, dtype: torch.dtype = torch.float32,
            check: bool = True, tokenizer: Optional[Path] = None, log=print) -> dict:
    """Convert on an initialised parallel context (collective: every rank calls it). Returns
    {dropped, kept, check} for reporting."""
    from megavlm.model.build import build_model
    from megavlm.model.reference import from_openlm_names
    from megavlm.train import checkpoint as ckpt  # writing a checkpoint is the trainer's format

    t0 = time.perf_counter()
    state, dropped = openlm_io.read_state_dict(input_path, run.model)  # checks inv_freq vs rope_base
    openlm_io.validate_state_dict(state, run.model)
    state = {k: v.float() for k, v in state.items()}
    full = from_openlm_names(state, run.model)
    chunks, _ = build_model(run, parallel, dtype, backend="local")
    kept = openlm_io.place_full_tensors(chunks, full, parallel.tp_rank, parallel.tp)
    meta = {"stage": "import", "step": 0, "steps": 0, "fractions": [], "tokens": 0, "seed": run.seed,
            "source": str(input_path)}
    ckpt.save(out, chunks, None, meta, {}, parallel.dp_rank, write_loader=False, run_config=run,
              tokenizer=tokenizer)
    log(f"wrote {out} ({time.perf_counter() - t0:.1f} s; tp {parallel.tp}, pp {parallel.pp}, {dtype})")
    report = {"dropped": dropped, "kept": sorted(set(kept)), "check": None}
    if check:
        report["check"] = verify(run, parallel, out, state, dtype=dtype, log=log)
    return report


def verify(run: RunConfig, parallel, checkpoint: Path, state: dict, *, dtype: torch.dtype = torch.float32,
           log=print) -> dict:
    """Load ``checkpoint`` at this run's layout into a freshly built model and compare it with the
    OpenLM ``state``: gathered tensors exactly, and (pp 1) logits against the reference forward."""
    from megavlm.checkpoint_format import load_model_weights
    from megavlm.model.build import build_model
    from megavlm.model.export import full_tensors

    fresh, _ = build_model(run, parallel, dtype, backend="local")
    load_model_weights(Path(checkpoint), fresh)
    gathered = full_tensors(fresh, tp_group=parallel.tp_group, pp_group=parallel.pp_group)
    expect = {k: v.float().to(dtype).float() for k, v in state.items()}  # what the checkpoint can hold
    openlm_io.check_tensors(gathered, expect, run.model)
    result = {"tensors": "equal", "tp": parallel.tp, "pp": parallel.pp}
    if parallel.pp == 1:
        rtol = 1e-4 if dtype == torch.float32 else 2e-2
        result.update(openlm_io.check_logits(fresh, expect, run.model, tp_group=parallel.tp_group,
                                             tp_size=parallel.tp, pp_size=1, rtol=rtol))
    log(f"check at tp {parallel.tp}, pp {parallel.pp}: tensors equal"
        + (f"; logits vs reference: relative L2 {result['rel']:.2e}, max abs {result['max_abs']:.2e}"
           if "rel" in result else " (logits check needs pp 1)"))
    return result


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--input", required=True, type=Path, help="OpenLM state dict (.pt/.bin/.safetensors)")
    ap.add_argument("--config", required=True, help="recipe giving the model shape and layout")
    ap.add_argument("--out", type=Path, help="checkpoint directory to write")
    ap.add_argument("--verify", type=Path, default=None,
                    help="instead of converting: load this checkpoint at the recipe's layout and check "
                         "it against --input")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                    help="parameter dtype stored (fp32 keeps the source exactly; loads into bf16 runs)")
    ap.add_argument("--tokenizer", type=Path, default=None, help="tokenizer file to store with it")
    ap.add_argument("--no-check", action="store_true", help="skip the read-back and reference check")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=2")
    args = ap.parse_intermixed_args(argv)
    if (args.out is None) == (args.verify is None):
        ap.error("give --out (convert) or --verify (check an existing checkpoint)")

    from megavlm.parallel.state import Parallel

    try:
        run = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"convert_openlm: config error: {e}", file=sys.stderr)
        return 2
    parallel = Parallel.initialize(run.parallel, run.seed)
    log = print if parallel.rank == 0 else (lambda s: None)
    try:
        if args.verify is not None:
            state, _ = openlm_io.read_state_dict(args.input, run.model)
            openlm_io.validate_state_dict(state, run.model)
            verify(run, parallel, args.verify, state, dtype=DTYPES[args.dtype], log=log)
            return 0
        report = convert(run, parallel, args.input, args.out, dtype=DTYPES[args.dtype],
                         check=not args.no_check, tokenizer=args.tokenizer, log=log)
    except (openlm_io.ConversionError, FileNotFoundError) as e:
        print(f"convert_openlm: error: {e}", file=sys.stderr)
        return 2
    finally:
        parallel.destroy()
    if report["dropped"]:
        log(f"rotary buffers match model.rope_base={run.model.rope_base:g}, recomputed from it: "
            f"{report['dropped'][:3]}{' …' if len(report['dropped']) > 3 else ''}")
    if report["kept"]:
        log(f"not in the state dict, seeded init kept: {', '.join(report['kept'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
