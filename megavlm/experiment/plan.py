"""A sweep as jobs that share prefixes, and how one job runs.

The paper's grid is expensive only if every cell retrains its whole chain. Here a cell's chain is
three jobs, and a job is shared by every cell that agrees on the variables it depends on:

* ``text/<seed>`` — the text stage, once per seed;
* ``image/<seed, fraction, image_ratio, instruct_ratio>`` — the image stage, once per branch;
* ``cell/<all variables>`` — fine-tuning (its length is the epoch count) and the evaluation.

Each job owns a run directory. A later job's run directory holds symlinks named after the earlier
stages that point into the run directories that trained them, so the engine's own rules do the
rest: a finished stage is skipped, ``init: {stage, fraction}`` finds the shared checkpoint, and an
interrupted stage resumes from its newest checkpoint. A job that finished writes ``job.json`` into
its run directory; re-running the sweep skips it.

The plan (``<sweep_dir>/plan.json``) is plain JSON so a SLURM job on another node runs the same job
with ``python -m megavlm.sweep job <sweep_dir> <job id>``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from megavlm.config import RunConfig, load_config
from megavlm.experiment.grid import GridError, cell_overrides, cells, roles

PLAN = "plan.json"
DONE = "job.json"


@dataclass
class Job:
    id: str
    """``text/s1``, ``image/s1-f0.8-r0.1-i0``, ``cell/s1-f0.8-r0.1-i0-e2``."""
    kind: str
    """text | image | cell"""
    run_dir: str
    stage: str
    """The one stage this job trains."""
    overrides: list[str]
    links: dict[str, str] = field(default_factory=dict)
    """Earlier stage name -> run directory that trained it."""
    deps: list[str] = field(default_factory=list)
    cell: Optional[dict] = None

    def done(self) -> bool:
        return (Path(self.run_dir) / DONE).is_file()


def build_jobs(run: RunConfig, full: dict[str, list], sweep_dir: Path,
               rewarm_peak: Optional[float] = None, import_pattern: Optional[str] = None) -> list[Job]:
    """Every job of the grid, each once, in an order where dependencies come first. A recipe whose
    image stage imports its text checkpoint (``init.path``) has no text jobs: each image job
    imports the checkpoint its fraction names."""
    r = roles(run)
    sweep_dir = Path(sweep_dir).resolve()
    jobs: dict[str, Job] = {}
    for c in cells(full):
        tk, ik, ck = c.key("seed"), c.key("instruct_ratio"), c.key("epochs")
        text_dir, image_dir = sweep_dir / "text" / tk, sweep_dir / "image" / ik
        overrides = cell_overrides(run, c, rewarm_peak=rewarm_peak, import_pattern=import_pattern)
        # fraction 0: the image stage starts from random weights; imported: from init.path
        from_text = c.fraction != 0.0 and not r.imported
        if not r.imported:
            jobs.setdefault(f"text/{tk}", Job(f"text/{tk}", "text", str(text_dir), r.text, [f"seed={c.seed}"]))
        jobs.setdefault(f"image/{ik}", Job(
            f"image/{ik}", "image", str(image_dir), r.image, overrides,
            links={r.text: str(text_dir)} if from_text else {}, deps=[f"text/{tk}"] if from_text else []))
        links = {r.image: str(image_dir)}
        if not r.imported:
            links = {r.text: str(text_dir), **links}
        jobs[f"cell/{ck}"] = Job(f"cell/{ck}", "cell", str(sweep_dir / "cells" / ck), r.sft, overrides,
                                 links=links, deps=[f"image/{ik}"], cell=c.as_dict())
    kinds = {"text": 0, "image": 1, "cell": 2}
    return sorted(jobs.values(), key=lambda j: kinds[j.kind])


def count_stage_runs(jobs: list[Job]) -> dict[str, int]:
    """How many training runs of each stage the grid needs (what prefix sharing saves)."""
    out = {"text": 0, "image": 0, "cell": 0}
    for j in jobs:
        out[j.kind] += 1
    return out


def recipe_fingerprint(config_path: str, base_overrides: list[str], settings: Optional[dict] = None) -> str:
    """Identifies the recipe (and sweep settings) of a sweep directory, so a changed recipe never
    reuses stale runs. It hashes what the user wrote (the YAML tree and the overrides), not the
    resolved config, so a new config field with a default does not orphan finished sweeps."""
    import yaml

    load_config(config_path, base_overrides)  # still a valid recipe
    tree = yaml.safe_load(Path(config_path).read_text()) or {}
    tree.pop("run_dir", None)
    blob = json.dumps({"recipe": tree, "overrides": list(base_overrides), "settings": settings or {}},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def write_plan(sweep_dir: Path, config_path: str, base_overrides: list[str], full: dict, jobs: list[Job],
               eval_limit: Optional[int], rewarm_peak: Optional[float] = None, tag: str = "",
               import_pattern: Optional[str] = None) -> Path:
    """Write ``plan.json``; refuse a sweep directory that holds another recipe's runs.

    Several grids may share one sweep directory (each invocation rewrites the plan; finished jobs
    of earlier grids stay and are reused wherever the new grid needs them); ``tag`` names the
    results files of this grid."""
    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    settings = {"eval_limit": eval_limit, "rewarm_peak": rewarm_peak}
    if import_pattern is not None:  # only when given: older sweeps keep their fingerprint
        settings["import_pattern"] = import_pattern
    fp = recipe_fingerprint(config_path, base_overrides, settings)
    path = sweep_dir / PLAN
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("fingerprint") != fp:
            raise GridError(f"{sweep_dir} holds a sweep of a different recipe (fingerprint "
                            f"{old.get('fingerprint')} != {fp}); use another --out")
    plan = {"config": str(Path(config_path).resolve()), "base_overrides": base_overrides, "fingerprint": fp,
            "grid": full, "eval_limit": eval_limit,
            "tag": tag, "jobs": [asdict(j) for j in jobs]}
    tmp = path.with_name(PLAN + ".tmp")
    tmp.write_text(json.dumps(plan, indent=1))
    tmp.replace(path)
    return path


def read_plan(sweep_dir: Path) -> dict:
    path = Path(sweep_dir) / PLAN
    if not path.is_file():
        raise GridError(f"no sweep plan at {path}")
    return json.loads(path.read_text())


def plan_jobs(plan: dict) -> list[Job]:
    return [Job(**j) for j in plan["jobs"]]


def ensure_data(run: RunConfig, progress: bool = False) -> None:
    """The sweep's preparation step, once before any job starts: build what the recipe's
    ``data.build`` says (megavlm.prepare). Jobs themselves only check that it is there."""
    from megavlm.prepare import prepare_recipe

    prepare_recipe(run, progress=progress)


def _require_data(plan: dict, run: RunConfig) -> None:
    """A job (perhaps on another node) reads the data the sweep prepared; it never builds it."""
    from megavlm.prepare import require_prepared

    require_prepared(run, plan["config"], plan["base_overrides"])


def link_stages(run_dir: Path, links: dict[str, str]) -> None:
    """``<run_dir>/<stage>`` -> the run directory that trained that stage (relative symlinks)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for stage, owner in links.items():
        link, target = run_dir / stage, Path(owner) / stage
        target.mkdir(parents=True, exist_ok=True)
        rel = os.path.relpath(target, run_dir)
        if link.is_symlink() and os.readlink(link) == rel:
            continue
        if link.exists() or link.is_symlink():
            raise GridError(f"{link} exists and is not the link to {target}")
        link.symlink_to(rel, target_is_directory=True)


def job_config(plan: dict, job: Job) -> RunConfig:
    """The job's resolved recipe; a cell's fine-tuning stage gets the cell's ``epochs``, and its
    step count follows from its data when it trains (megavlm.train.plan), as `megavlm plan` shows."""
    base = plan["base_overrides"] + job.overrides + [f"run_dir={job.run_dir}"]
    run = load_config(plan["config"], base)
    if job.kind == "cell":  # job.stage is the fine-tuning stage (roles() of a 0 % cell's chain fails:
        # its image stage starts from random weights, not from a text checkpoint)
        run = load_config(plan["config"], base + [f"stages.{job.stage}.epochs={int(job.cell['epochs'])}"])
    return run


def describe_jobs(plan: dict, jobs: list[Job]) -> list[dict]:
    """Every job with the resolved plan of the stage it trains (megavlm.train.plan.plan_run /
    StagePlan.describe, as ``megavlm plan`` prints it): what ``megavlm sweep --dry-run`` shows.
    Data-sized stages whose data is absent are estimated and say so."""
    from megavlm.train.plan import plan_run

    out = []
    for j in jobs:
        sp = plan_run(job_config(plan, j))[j.stage]
        d = sp.describe(points=2)
        init = sp.config.init
        out.append({"id": j.id, "done": j.done(), "deps": list(j.deps), "stage": j.stage,
                    "init": init.path or (f"{init.stage}@{init.fraction:g}" if init.stage else None),
                    "lr_start": d["lr"][0][1], "lr_end": d["lr"][-1][1], "plan": d})
    return out


def format_job(desc: dict) -> str:
    """One dry-run line of a job: id, dependencies, steps, schedule and its LR from start to end."""
    p, s = desc["plan"], desc["plan"]["schedule"]
    est = ", estimated" if p.get("estimated") else ""
    if s["kind"] == "continue":
        src = s.get("source_stage") or (s.get("source") or {}).get("from") or "imported source"
        how = f"continue {src} from {s['source_fraction']:g}"
    else:
        how = f"{s['kind']} peak {s['peak']:g} warmup {s['warmup_steps']}"
    return (f"{'done' if desc['done'] else 'todo'}  {desc['id']}  <- {', '.join(desc['deps']) or '-'}\n"
            f"      {desc['stage']}: init {desc['init'] or 'random'}; {p['steps']} steps ({p['budget']}{est}) x "
            f"{p['tokens_per_step']} positions, seq {p['seq_length']}; {how}; "
            f"lr {desc['lr_start']:.6g} -> {desc['lr_end']:.6g}")


def run_job(sweep_dir: Path, job_id: str, log: Callable[[str], None] = print) -> dict:
    """Train the job's stage in this process (resuming / skipping as the engine does); a cell then
    scores its final checkpoint. Writes ``job.json`` last, so a killed job is simply re-run."""
    from megavlm.parallel.state import Parallel
    from megavlm.train import checkpoint as ckpt
    from megavlm.train.stages import run_stages

    plan = read_plan(sweep_dir)
    jobs = {j.id: j for j in plan_jobs(plan)}
    if job_id not in jobs:
        raise GridError(f"no job {job_id!r} in {sweep_dir}/{PLAN}")
    job = jobs[job_id]
    if job.done():
        return json.loads((Path(job.run_dir) / DONE).read_text())
    missing = [d for d in job.deps if not jobs[d].done()]
    if missing:
        raise GridError(f"job {job_id} needs {missing} to finish first")
    run_dir = Path(job.run_dir)
    link_stages(run_dir, job.links)
    run = job_config(plan, job)
    _require_data(plan, run)
    t0 = time.perf_counter()
    parallel = Parallel.initialize(run.parallel, run.seed)
    try:
        run_stages(run, parallel, only=[job.stage], log=log)
    finally:
        parallel.destroy()
    out = {"job": job.id, "kind": job.kind, "cell": job.cell, "train_seconds": time.perf_counter() - t0,
           "steps": ckpt.latest(run_dir, job.stage).step}
    if job.kind == "cell":
        from megavlm.experiment.scoring import evaluate_checkpoint

        final = ckpt.at_fraction(run_dir, job.stage, 1.0).path
        t1 = time.perf_counter()
        out["eval"] = evaluate_checkpoint(final, run_dir / "eval", demo_root=run.data.root,
                                          limit=plan.get("eval_limit"))
        out["eval_seconds"] = time.perf_counter() - t1
    tmp = run_dir / (DONE + ".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(run_dir / DONE)
    return out
