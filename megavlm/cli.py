"""The ``megavlm`` command: a small, closed set of subcommands.

    megavlm train --config C [key.path=value ...]     train a recipe (torchrun for several processes)
    megavlm train --config C --check                  check every stage's data/checkpoints/disk, train nothing
    megavlm plan  --config C [overrides] [--json]     steps, checkpoints and LR schedule, no training
    megavlm prepare --config C | demo [--root D]      build a recipe's data (before training)
    megavlm demo  [--run-dir D]                       the offline three-stage demo
    megavlm bench {train,masked-ce,throughput,data,attention,eval,prep}  benchmarks (markdown under benchmarks/)
    megavlm sweep --config C --grid name=v1,v2 [...]  the paper's experiment grid (megavlm.sweep)
    megavlm eval  {text,vision,all} --checkpoint D     lm-eval text tasks, vision tasks, stable score
    megavlm selftest [--size small|full] [--out-dir D] acceptance run on a new machine (megavlm.selftest)
"""

from __future__ import annotations

import argparse
import json
import sys

from megavlm.console import quiet_libraries


def _load(args):
    from megavlm.config import ConfigError, load_config

    try:
        return load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"megavlm: config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_plan(args) -> int:
    from megavlm.train.plan import describe_run

    run = _load(args)
    if args.check:
        return _check(run, args)
    p = describe_run(run)
    if args.memory:
        from megavlm.model.memory import recipe_memory

        p["memory"] = recipe_memory(run, dp=args.dp, attention=args.attention,
                                    capacity_gib=args.gpu_gib)
    if args.json:
        print(json.dumps(p))
    else:
        for s in p["stages"]:
            sc = s["schedule"]
            print(f"{s['name']}: {s['steps']} steps, {s['tokens']:.3g} tokens, "
                  f"batch {s['global_batch_size']} {s.get('batch_unit', 'positions')}, "
                  f"text attention {s['text_attention']}, schedule {sc['kind']}"
                  f" (lr {s['lr'][0][1]:.3g} → {s['lr'][-1][1]:.3g}), checkpoints at "
                  + ", ".join(f"{f:g}→step {k}" for f, k in s["checkpoints"]))
        for m in p.get("memory", []):
            print(f"{m['stage']}: " + "\n".join(m["lines"]))
    return 0


def _check(run, args) -> int:
    """``train --check`` / ``plan --check``: every problem of every stage (megavlm.preflight)."""
    from megavlm.preflight import require_ready, require_same_run
    from megavlm.prepare import own_data_hint

    hint = (f"run `megavlm prepare --config {args.config}` to build the demo data"
            if run.data.build == "demo" else "to prepare own data: " + own_data_hint(run))
    require_ready(run, hint=hint)
    if not getattr(args, "force_config", False):
        require_same_run(run)
    print(f"{args.config}: ready to train ({len(run.stages)} stages checked)")
    return 0


def cmd_train(args) -> int:
    from megavlm.parallel.state import Parallel
    from megavlm.preflight import require_ready
    from megavlm.prepare import own_data_hint, prepare_recipe, require_prepared
    from megavlm.train.stages import run_stages

    run = _load(args)
    if args.check:  # only the checks: nothing is built or written
        return _check(run, args)
    prepare_recipe(run)  # `megavlm prepare --config C` first (data.build: demo); the trainer only reads
    if run.data.build == "demo":
        require_prepared(run, args.config, args.overrides)
    # every stage's data, init checkpoints, run folder, disk: all problems at once, before anything is written
    require_ready(run, hint=None if run.data.build == "demo" else "to prepare own data: " + own_data_hint(run))
    parallel = Parallel.initialize(run.parallel, run.seed)
    try:
        run_stages(run, parallel, only=args.stage or None, force_config=args.force_config, check=False)
    finally:
        parallel.destroy()
    return 0


def cmd_demo(args) -> int:
    from megavlm.experiment.demo import main as demo_main

    return demo_main(args)


def cmd_bench(args, rest: list[str]) -> int:
    if args.what == "train":
        from megavlm.bench.train import main as bench_main
    elif args.what == "data":
        from megavlm.bench.data import main as bench_main
    elif args.what == "prep":
        from megavlm.bench.prep import main as bench_main
    elif args.what == "throughput":
        from megavlm.bench.throughput import main as bench_main
    elif args.what == "attention":
        from megavlm.bench.attention import main as bench_main
    elif args.what == "eval":
        from megavlm.bench.eval import main as bench_main
    else:
        from megavlm.bench.masked_ce import main as bench_main
    return bench_main(rest) or 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megavlm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("train", "plan"):
        s = sub.add_parser(name)
        s.add_argument("--config", required=True, help="YAML recipe (launch/configs/*.yaml)")
        s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. stages.1.tokens=1e6")
        if name == "plan":
            s.add_argument("--json", action="store_true", help="print one JSON object")
            s.add_argument("--check", action="store_true", help="as train --check: only the preflight checks")
            s.add_argument("--memory", action="store_true",
                           help="per-rank memory plan (megavlm.model.memory); JSON field 'memory'")
            s.add_argument("--dp", type=int, default=1, help="data-parallel size for --memory")
            s.add_argument("--attention", choices=["flash", "dense"], default="flash",
                           help="attention path for --memory (dense stores S x S scores)")
            s.add_argument("--gpu-gib", type=float, default=79.6,
                           help="GPU memory for --memory's verdict (an '80 GB' H100: 79.6 GiB)")
        else:
            s.add_argument("--stage", action="append", help="run only these stages (repeatable)")
            s.add_argument("--check", action="store_true",
                           help="only check what every stage needs (data, init checkpoints, run folder, "
                                "disk) and list every problem; trains and writes nothing")
            s.add_argument("--force-config", action="store_true",
                           help="continue a run folder made with another config or other data "
                                "(megavlm.preflight.non_identity_keys never count as a change)")
    d = sub.add_parser("demo")
    d.add_argument("--run-dir", default="runs/demo")
    d.add_argument("--config", default=None, help="recipe (default launch/configs/demo.yaml)")
    d.add_argument("--eval-limit", type=int, default=None, help="examples per evaluation task (default all)")
    d.add_argument("overrides", nargs="*")
    b = sub.add_parser("bench")
    b.add_argument("what", choices=BENCHES)
    sub.add_parser("prepare", add_help=False, help="build a recipe's data; its own options: megavlm prepare --help")
    sub.add_parser("sweep", add_help=False, help="experiment grid; its own options: megavlm sweep --help")
    sub.add_parser("selftest", add_help=False, help="acceptance run; its own options: megavlm selftest --help")
    sub.add_parser("eval", add_help=False, help="evaluation {text,vision,all}; its own options: megavlm eval --help")
    return p


BENCHES = ["train", "masked-ce", "throughput", "data", "attention", "eval", "prep"]
"""``megavlm bench NAME``: each benchmark has its own options (``megavlm bench NAME --help``)."""


def _user_errors() -> tuple[type, ...]:
    """Errors that describe bad input (a file, a record, a key): one line, no traceback."""
    from megavlm.config import ConfigError
    from megavlm.data.indexed import DataError
    from megavlm.data.tokenizer import TokenizerError
    from megavlm.train.checkpoint import CheckpointError

    return ConfigError, CheckpointError, DataError, TokenizerError, FileNotFoundError


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sweep"]:
        from megavlm.sweep import main as sweep_main

        return sweep_main(argv[1:])
    if argv[:1] == ["selftest"]:
        from megavlm.selftest.run import main as selftest_main

        return selftest_main(argv[1:])
    if argv[:1] == ["prepare"]:
        from megavlm.prepare import main as prepare_main

        return prepare_main(argv[1:])
    if argv[:1] == ["eval"]:
        from megavlm.demo.suites import OfflineSuite
        from megavlm.eval.cli import main as eval_main

        return eval_main(argv[1:], offline=OfflineSuite.default)  # the offline suites are the demo's
    if argv[:1] == ["bench"] and argv[1:2] and argv[1] in BENCHES:  # its own --help and options
        args, rest = argparse.Namespace(cmd="bench", what=argv[1]), argv[2:]
    else:
        parser = build_parser()
        args, rest = parser.parse_known_args(argv)
        if args.cmd != "bench" and rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.cmd == "bench":
            return cmd_bench(args, rest)
        return {"train": cmd_train, "plan": cmd_plan, "demo": cmd_demo}[args.cmd](args)
    except _user_errors() as e:
        print(f"megavlm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
