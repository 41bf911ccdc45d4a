"""``megavlm sweep``: the paper's experiment grid over a three-stage recipe, locally or on SLURM.

    megavlm sweep --config C --grid fraction=0.8,1.0 --grid seed=1,2 [--grid epochs=1,2]
                  [--out DIR] [--jobs N] [--eval-limit N] [--rewarm-peak LR] [--dry-run]
                  [--slurm [--wait] [--sbatch-arg=--partition=x ...]] [key.path=value ...]

Variables: fraction, image_ratio, instruct_ratio, epochs, seed (see megavlm.experiment.grid).
A recipe whose image stage starts from an imported text checkpoint (launch/configs/paper-1b.yaml)
sweeps ``fraction`` over imported checkpoints: ``--import-path`` (default derived from the recipe's
``init.path``) names each, ``schedule.source.fraction`` places it on its source schedule;
``--dry-run`` prints every job with its stage's resolved plan (steps, schedule, LR start -> end).
``--grid`` also takes a YAML/JSON file mapping variables to lists. The whole grid is checked
before anything runs. Jobs share prefixes (one text run per seed, one image run per branch, see
megavlm.experiment.plan), run ``--jobs`` at a time with the cores split between them, and are
skipped once finished, so re-running the command resumes. With ``--slurm`` each job becomes an
sbatch script with ``afterok`` dependencies instead. The sweep directory (default
``<run_dir>/sweep``) ends with results.csv, results.json, results.md (the tables of the paper's
figures the grid varies), plots/sweep_<variable>.png and the paper's figures as it draws them
(plots/fig4_fraction.png, fig5_image_ratio.png, fig6_image_ratio_scratch.png,
fig7_instruct_ratio.png, fig8_epochs.png: stable score per cell, seeds as error bars).

Internal (what the executors launch): ``python -m megavlm.sweep job DIR ID`` and ``... collect DIR``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megavlm sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a three-stage recipe, or two stages whose first imports its "
                   "text checkpoint (launch/configs/*.yaml)")
    p.add_argument("--grid", action="append", default=[], help="name=v1,v2 or a YAML/JSON grid file (repeatable)")
    p.add_argument("--out", default=None, help="sweep directory (default <run_dir>/sweep)")
    p.add_argument("--jobs", type=int, default=1, help="jobs side by side (cores are split between them)")
    p.add_argument("--cores", type=int, default=None, help="cores to split (default: all)")
    p.add_argument("--eval-limit", type=int, default=None, help="examples per evaluation task (default all)")
    p.add_argument("--epoch-tokens", type=int, default=None,
                   help="deprecated, ignored: a cell's fine-tuning stage runs `epochs` passes of its data "
                        "(stages.<sft>.epochs); removed in the next release")
    p.add_argument("--rewarm-peak", type=float, default=None,
                   help="peak LR of the re-warmed image stage at fraction 0.0 and 1.0 "
                        "(default 3e-3, the paper's re-warm peak, line 149)")
    p.add_argument("--import-path", default=None, metavar="PATTERN",
                   help="a recipe whose image stage imports its text checkpoint (init.path): where the "
                        "checkpoint of each swept fraction is, with {pct} (whole percent) or {fraction}, "
                        "e.g. data/dclm-1b/imported/dclm-1b-{pct}pct (default: the recipe's init.path with "
                        "its percent replaced)")
    p.add_argument("--tag", default="", help="name of this grid's results (results-<tag>.csv, plots/<tag>/) "
                   "when several grids share one --out and its runs")
    p.add_argument("--dry-run", action="store_true", help="validate and print the jobs, run nothing")
    p.add_argument("--slurm", action="store_true", help="submit one sbatch job per sweep job")
    p.add_argument("--sbatch", default="sbatch", help="sbatch executable")
    p.add_argument("--sbatch-arg", action="append", default=[], help="extra #SBATCH line, e.g. --partition=cpu")
    p.add_argument("--cpus-per-job", type=int, default=2, help="SLURM --cpus-per-task")
    p.add_argument("--wait", action="store_true", help="with --slurm: follow the jobs to their end and "
                   "name the failed ones and the ones cancelled because of them (status 1)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the recipe")
    return p


def prepare(args) -> tuple[Path, list]:
    """Validate the grid against the recipe, plan the jobs and write plan.json (runs nothing)."""
    from megavlm.config import load_config
    from megavlm.experiment.grid import parse_grid, validate
    from megavlm.experiment.plan import build_jobs, write_plan

    run = load_config(args.config, args.overrides)
    if args.epoch_tokens is not None:
        print("megavlm sweep: --epoch-tokens is deprecated and ignored: each cell sets the fine-tuning "
              "stage's epochs and its steps follow from its data; it goes in the next release", file=sys.stderr)
    full = validate(run, parse_grid(args.grid), import_pattern=args.import_path)
    if not args.dry_run:
        from megavlm.experiment.grid import GridError, missing_imports

        missing = missing_imports(run, full, args.import_path)
        if missing:
            raise GridError(f"imported checkpoint(s) missing or at another fraction: {', '.join(missing)} (tools/convert_openlm.py "
                            "makes them; --import-path says where they are)")
        from megavlm.experiment.plan import ensure_data

        ensure_data(run)  # once, before jobs start side by side
    sweep_dir = Path(args.out or Path(run.run_dir) / "sweep").resolve()
    jobs = build_jobs(run, full, sweep_dir, rewarm_peak=args.rewarm_peak, import_pattern=args.import_path)
    write_plan(sweep_dir, args.config, list(args.overrides), full, jobs, args.eval_limit, args.rewarm_peak, args.tag,
               import_pattern=args.import_path)
    return sweep_dir, jobs


def collect(sweep_dir: Path) -> tuple[list, list]:
    """results.csv / results.json and the figures from whatever cells have finished."""
    from megavlm.experiment.plan import read_plan
    from megavlm.experiment.plots import paper_figures, sweep_figures
    from megavlm.experiment.results import write_results

    csv_path, json_path, rows = write_results(sweep_dir)
    plan = read_plan(sweep_dir)
    plots = Path(sweep_dir) / "plots" / plan["tag"] if plan.get("tag") else Path(sweep_dir) / "plots"
    note = f"recipe {Path(plan['config']).name}"  # every figure names the scale it was drawn at
    figs = (sweep_figures(rows, plan["grid"], plots) + paper_figures(rows, plan["grid"], plots, scale_note=note)
            if rows else [])
    return [csv_path, json_path], figs


def run_sweep(args) -> int:
    from megavlm.experiment.executors import run_local, submit_slurm
    from megavlm.experiment.plan import count_stage_runs

    sweep_dir, jobs = prepare(args)
    n = count_stage_runs(jobs)
    todo = [j for j in jobs if not j.done()]
    text = f"{n['text']} text runs + " if n["text"] else "(text checkpoints imported) "
    print(f"sweep {sweep_dir}: {n['cell']} cells = {text}{n['image']} image runs + "
          f"{n['cell']} fine-tuning runs; {len(jobs) - len(todo)} finished, {len(todo)} to run")
    if args.dry_run:
        from megavlm.experiment.plan import describe_jobs, format_job, read_plan

        for d in describe_jobs(read_plan(sweep_dir), jobs):
            print("  " + format_job(d))
        return 0
    if args.slurm:
        ids = submit_slurm(sweep_dir, jobs, cpus=args.cpus_per_job, extra=args.sbatch_arg, sbatch=args.sbatch)
        print(f"submitted {len(ids)} SLURM jobs (ids in {sweep_dir / 'slurm' / 'submitted.json'})")
        if args.wait:
            from megavlm.experiment.executors import JobFailed, wait_slurm

            scontrol = str(Path(args.sbatch).with_name("scontrol")) if "/" in args.sbatch else "scontrol"
            try:
                wait_slurm(sweep_dir, jobs, ids, scontrol=scontrol)
            except JobFailed as e:
                print(f"megavlm sweep: {e}", file=sys.stderr)
                return 1
            print(f"all {len(ids)} SLURM jobs finished")
        return 0
    from tqdm.auto import tqdm
    from megavlm.progress import bars_enabled

    t0 = time.perf_counter()
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="sweep jobs", unit="job",
               disable=not bars_enabled())

    def event(what, job):
        if what == "start":
            bar.set_postfix_str(job.id)
        elif what == "done":
            bar.update(1)
        else:
            bar.write(f"job {job.id} failed (log {Path(job.run_dir) / 'job.log'})")

    try:
        run_local(sweep_dir, jobs, parallel_jobs=args.jobs, cores=args.cores, on_event=event)
    finally:
        bar.close()
    files, figs = collect(sweep_dir)
    print(f"sweep finished in {time.perf_counter() - t0:.0f} s: " + ", ".join(str(p) for p in files + figs))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """Entry of ``megavlm sweep``; bad input is one line ``megavlm sweep: error: …`` and status 2."""
    from megavlm.config import ConfigError
    from megavlm.experiment.executors import JobFailed

    from megavlm.console import quiet_libraries

    quiet_libraries()  # the job subprocesses start here, not through megavlm.cli
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["job"] and len(argv) == 3:
            from megavlm.experiment.plan import run_job

            run_job(Path(argv[1]), argv[2])
            return 0
        if argv[:1] == ["collect"] and len(argv) == 2:
            files, figs = collect(Path(argv[1]))
            print("\n".join(str(p) for p in files + figs))
            return 0
        return run_sweep(build_parser().parse_args(argv))
    except (ConfigError, JobFailed, FileNotFoundError) as e:
        print(f"megavlm sweep: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
