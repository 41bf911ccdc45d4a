"""Command line and report of ``megavlm selftest`` (see the package docstring)."""

from __future__ import annotations

import argparse
import datetime as _dt
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

from megavlm.selftest import checks
from megavlm.selftest.environment import Environment, detect

CHECKS = ("kernel", "te", "masked-ce", "throughput")


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
    lines += ["", f"**{'FAILED: ' + ', '.join(failed) if failed else 'all checks passed or skipped'}**"]
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
    results = []
    for name in only:
        if name == "kernel":
            c = checks.masked_ce_kernel(env, size)
        elif name == "te":
            c = checks.te_spec(env, size)
        elif name == "masked-ce":
            c = checks.masked_ce_benchmark(env, size, args.out_dir)
        else:
            c = checks.throughput(env, size, args.out_dir, args.config)
        print(f"[{c.status}] {c.name} ({c.seconds:.1f} s): {c.detail}", flush=True)
        results.append(c)
    command = "megavlm selftest " + " ".join(shlex.quote(a) for a in argv)
    path = write_report(args.out_dir, env.slug(), "selftest", render(env, results, size, command))
    print(f"wrote {path}")
    return 1 if any(c.status == "failed" for c in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
