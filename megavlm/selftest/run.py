"""Command line and report of ``megavlm selftest`` (see the package docstring)."""

from __future__ import annotations

import argparse
import datetime as _dt
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from megavlm.selftest import checks
from megavlm.selftest.environment import Environment, detect

CHECKS = ("kernel", "te", "masked-ce", "throughput", "checkpoint", "generation")
LABELS = {"kernel": "masked-CE kernel vs reference", "te": "TE vs local layer spec",
          "masked-ce": "masked-CE benchmark", "throughput": "training throughput",
          "checkpoint": "checkpoint write + resume", "generation": "cached generation"}


class Interrupted(BaseException):
    """SIGINT or SIGTERM during the selftest: stop the check that runs, report what ran.

    A BaseException, so no check's own ``except Exception`` turns it into a failure; the training
    the checks run installs no stop handlers of its own (megavlm.bench.throughput.case_config),
    so a signal never writes a stop checkpoint."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _interrupt(signum, frame):
    raise Interrupted(signum)


def render(env: Environment, results: list[checks.Check], size: str, command: str) -> str:
    today = _dt.date.today().isoformat()
    where = env.gpus[0][0] if env.gpus else "CPU"
    lines = [f"# megavlm selftest, {where}, {today}", "", f"Command: `{command}`", "",
             f"Size: {size} ({'recipe sizes' if size == 'full' else 'small CPU sizes'})", "",
             "## Machine and paths", ""] + env.markdown()
    lines += ["", "## Checks", "", "| check | result | seconds | detail |",
              "| --- | --- | ---: | --- |"]
    for c in results:
        detail = c.detail.replace("\n", " ").replace("|", "\\|")
        lines.append(f"| {c.name} | {c.status} | {c.seconds:.1f} | {detail} |")
    artifacts = [a for c in results for a in c.artifacts]
    if artifacts:
        lines += ["", "## Reports written", ""] + [f"- {Path(a).name}" for a in artifacts]
    failed = [c.name for c in results if c.status == "failed"]
    stopped = [c for c in results if c.status == "interrupted"]
    verdict = 'FAILED: ' + ', '.join(failed) if failed else 'all checks passed or skipped'
    if stopped:
        verdict = f"INTERRUPTED during {stopped[0].name}: the report of what ran so far; " + verdict
    lines += ["", f"**{verdict}**"]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="megavlm selftest", description=__doc__)
    p.add_argument("--size", choices=("auto", "small", "full"), default="auto",
                   help="auto: full with CUDA, small without")
    p.add_argument("--out-dir", type=Path, default=checks.ROOT / "benchmarks",
                   help="where the dated markdown reports go (default benchmarks/)")
    p.add_argument("--only", default=",".join(CHECKS),
                   help=f"comma list of checks to run: {', '.join(CHECKS)}")
    p.add_argument("--config", type=Path, default=None,
                   help="recipe of the throughput run (default dclm-1b full, tiny small)")
    args = p.parse_args(argv)
    only = [c.strip() for c in args.only.split(",") if c.strip()]
    for c in only:
        if c not in CHECKS:
            p.error(f"--only: unknown check {c!r} (choose from {', '.join(CHECKS)})")
    if args.config is not None and not args.config.exists():
        p.error(f"--config {args.config}: no such file")

    from megavlm.bench.artifact import write_report

    env = detect()
    if env.masked_ce_error:  # a forced path that cannot run is an error, never a fallback
        print(f"megavlm selftest: error: {env.masked_ce_error}", file=sys.stderr)
        return 2
    size = args.size if args.size != "auto" else ("full" if env.has_cuda else "small")
    print("\n".join(env.markdown()), flush=True)
    results: list[checks.Check] = []
    stopped_by: Optional[int] = None
    previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        # checkpoints of the checkpoint/generation checks live here and go with it, also on a signal
        with tempfile.TemporaryDirectory(prefix="megavlm-selftest-") as work:
            for name in only:
                print(f"[running] {LABELS[name]}", flush=True)
                t0 = time.perf_counter()
                try:
                    c = _run_check(name, env, size, args, Path(work))
                except Interrupted as e:
                    stopped_by = e.signum
                    c = checks.Check(LABELS[name], "interrupted",
                                     f"stopped by {signal.Signals(e.signum).name}; checks after it "
                                     f"were not run", seconds=time.perf_counter() - t0)
                print(f"[{c.status}] {c.name} ({c.seconds:.1f} s): {c.detail}", flush=True)
                results.append(c)
                if stopped_by is not None:
                    break
    except Interrupted as e:  # a second signal while cleaning up: still write the report
        stopped_by = e.signum
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    command = "megavlm selftest " + " ".join(shlex.quote(a) for a in argv)
    path = write_report(args.out_dir, env.slug(), "selftest", render(env, results, size, command))
    print(f"wrote {path}", flush=True)
    if stopped_by is not None:
        return 128 + stopped_by
    return 1 if any(c.status == "failed" for c in results) else 0


def _run_check(name: str, env: Environment, size: str, args, work: Path) -> checks.Check:
    from megavlm.selftest import engine

    if name == "kernel":
        return checks.masked_ce_kernel(env, size)
    if name == "te":
        return checks.te_spec(env, size)
    if name == "masked-ce":
        return checks.masked_ce_benchmark(env, size, args.out_dir)
    if name == "throughput":
        return checks.throughput(env, size, args.out_dir, args.config)
    if name == "checkpoint":
        return engine.checkpoint_resume(env, size, work)
    return engine.generation(env, size, work)


if __name__ == "__main__":
    raise SystemExit(main())
