"""``megavlm demo``: the offline main job, the paper's comparison in miniature.

On real data (World English Bible + WordNet text, Fashion-MNIST / Tux Paint images encoded once
by EfficientNet-Lite0; built and cached by megavlm.demo.corpus before training starts),
one process trains:

1. text pre-training, checkpoints at 20/40/60/80/100 % (``<run_dir>/pretrain``);
2. two branches of image-text pre-training + instruction tuning, side by side in the table:
   ``continue-80`` starts from the 80 % checkpoint with the text cosine continued (the paper's
   recommendation), ``rewarm-100`` from the 100 % checkpoint with a re-warmed cosine (the paper's
   baseline). Each branch is a run directory whose ``text`` entry links to the shared stage;
3. the offline evaluation suites on both fine-tuned checkpoints (megavlm.experiment.scoring).

It ends with a table of per-task accuracy and the text / vision stable scores of both branches
(also ``summary.md`` / ``summary.json``), the loss and LR figures under ``plots/``, and each
evaluation report under ``<branch>/eval``. Re-running reuses the corpus cache, skips finished
stages and reuses evaluations of unchanged checkpoints.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

from tqdm.auto import tqdm

from megavlm.config import load_config
from megavlm.experiment.grid import branch_overrides, roles
from megavlm.experiment.plan import link_stages
from megavlm.experiment.plots import demo_figures, read_metrics
from megavlm.experiment.scoring import evaluate_checkpoint
from megavlm.prepare import prepare_recipe
from megavlm.progress import bars_enabled
from megavlm.run_folder import EVAL_DIR, EVAL_SUMMARY, META
from megavlm.train import checkpoint as ckpt
from megavlm.train.plan import plan_run

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = ROOT / "launch" / "configs" / "demo.yaml"
BRANCHES: tuple[tuple[str, float], ...] = (("continue-80", 0.8), ("rewarm-100", 1.0))
"""(branch name, text checkpoint fraction the image stage starts from)."""
SHARED = "pretrain"


class StageBars:
    """A tqdm bar per stage, advanced by the trainer's per-step observer; log lines go above the bars."""

    def __init__(self, totals: dict[str, int], prefix: str = ""):
        self.totals, self.prefix, self.bars = totals, prefix, {}

    def write(self, msg: str) -> None:
        tqdm.write(msg)

    def observe(self, stage: str, step: int, model) -> None:
        if stage not in self.bars:
            self.bars[stage] = tqdm(total=self.totals[stage], initial=step - 1, unit="step",
                                    desc=f"{self.prefix}{stage}", leave=True, disable=not bars_enabled())
        self.bars[stage].update(step - self.bars[stage].n)
        if step >= self.totals[stage]:
            self.bars[stage].close()

    def close(self) -> None:
        for b in self.bars.values():
            b.close()


def train_chain(config: Path, overrides: list[str], run_dir: Path, parallel,
                log: Callable[[str], None] = print) -> dict[str, Path]:
    """Train the shared text stage and both branches' later stages; returns branch -> run dir."""
    from megavlm.train.stages import run_stages  # megatron-core: only when training

    base = load_config(config, overrides)
    r = roles(base)
    shared = run_dir / SHARED
    out = {}
    jobs = [(SHARED, shared, [], [r.text], {})]
    for name, f in BRANCHES:
        jobs.append((name, run_dir / name, branch_overrides(base, f), [r.image, r.sft], {r.text: str(shared)}))
    for name, rd, extra, only, links in jobs:
        run = load_config(config, overrides + extra + [f"run_dir={rd}"])
        if links:
            link_stages(rd, links)
        bars = StageBars({n: p.steps for n, p in plan_run(run).items()}, prefix=f"{name}: ")
        try:
            run_stages(run, parallel, only=only, log=bars.write, observer=bars.observe)
        finally:
            bars.close()
        if name != SHARED:
            out[name] = rd
    return out


def evaluate_branches(branches: dict[str, Path], sft_stage: str, demo_root: str,
                      limit: Optional[int] = None) -> dict[str, dict]:
    """Score each branch's final fine-tuned checkpoint; an unchanged checkpoint is not re-scored."""
    out = {}
    for name, rd in tqdm(list(branches.items()), desc="evaluating branches", unit="branch",
                         disable=not bars_enabled()):
        final = ckpt.at_fraction(rd, sft_stage, 1.0).path
        cache = rd / EVAL_DIR / EVAL_SUMMARY
        key = {"checkpoint": str(final.resolve()), "mtime": (final / META).stat().st_mtime, "limit": limit}
        if cache.is_file():
            prev = json.loads(cache.read_text())
            if prev.get("key") == key:
                out[name] = prev["scores"]
                continue
        scores = evaluate_checkpoint(final, rd / EVAL_DIR, demo_root=demo_root, limit=limit)
        cache.write_text(json.dumps({"key": key, "scores": scores}, indent=1))
        out[name] = scores
    return out


def score_table(scores: dict[str, dict]) -> str:
    """Markdown: per task accuracy (and chance) per branch, then the two stable scores."""
    names = list(scores)
    first = scores[names[0]]
    lines = ["| kind | task | chance | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for kind in ("text", "vision"):
        for task in first[kind]:
            c = first["chance"].get(task)
            lines.append(f"| {kind} | {task} | {c:.3f} | "
                         + " | ".join(f"{scores[n][kind].get(task, float('nan')):.3f}" for n in names) + " |")
    for kind in ("text", "vision"):
        lines.append(f"| **{kind}** | **stable score** (acc − chance) | 0 | "
                     + " | ".join(f"**{scores[n]['stable_score'][kind]:+.3f}**" for n in names) + " |")
    ppl = [scores[n]["metrics"].get("tuxpaint_caption_ppl", {}).get("perplexity") for n in names]
    if all(p is not None for p in ppl):
        lines.append("| vision | tuxpaint_caption_ppl (perplexity, lower is better) | — | "
                     + " | ".join(f"{p:.1f}" for p in ppl) + " |")
    return "\n".join(lines)


def stage_table(metrics_by_run: dict[str, dict[str, list[dict]]]) -> str:
    """Markdown: per run and stage, steps, first → last loss and LR, tokens/s."""
    out = ["| run | stage | steps | loss first → last | lr first → last | tokens/s |", "|---|---|---|---|---|---|"]
    for run, stages in metrics_by_run.items():
        for st, recs in stages.items():
            if not recs:
                continue
            f, last = recs[0], recs[-1]
            tps = sum(m["tokens"] for m in recs) / max(sum(m["tokens"] / max(m["tokens_per_s"], 1e-9) for m in recs), 1e-9)
            out.append(f"| {run} | {st} | {last['step']} | {f['loss']:.3f} → {last['loss']:.3f} | "
                       f"{f['lr']:.2e} → {last['lr']:.2e} | {tps:,.0f} |")
    return "\n".join(out)


def write_outputs(run_dir: Path, base, branches: dict[str, Path], scores: dict[str, dict],
                  seconds: Optional[float]) -> tuple[str, list[Path]]:
    """Plots, summary.md and summary.json in the run directory; returns the markdown and plot paths."""
    r = roles(base)
    text = read_metrics(run_dir / SHARED).get(r.text, [])
    text_plan = plan_run(base)[r.text]
    text_tokens = text_plan.steps * text_plan.tokens_per_step  # positions, at the stage's own row length
    fractions = dict(BRANCHES)
    info = {n: {"metrics": {k: v for k, v in read_metrics(rd).items() if k != r.text},
                "start_fraction": fractions[n], "stages": [r.image, r.sft]} for n, rd in branches.items()}
    plots = demo_figures(text, info, run_dir / "plots", text_tokens)
    chance_note = {n: {"vision_beats_chance": s["stable_score"]["vision"] > 0,
                       "text_beats_chance": s["stable_score"]["text"] > 0} for n, s in scores.items()}
    md = ["# megavlm demo", ""]
    if seconds is not None:
        md += [f"Wall time of this invocation: {seconds:.0f} s.", ""]
    md += ["## Evaluation (offline suites, final fine-tuned checkpoints)", "", score_table(scores), "",
           "## Training", "", stage_table({SHARED: {r.text: text}, **{n: i["metrics"] for n, i in info.items()}}),
           "", "Plots: " + ", ".join(str(p.relative_to(run_dir)) for p in plots), ""]
    text_md = "\n".join(md)
    (run_dir / "summary.md").write_text(text_md)
    (run_dir / "summary.json").write_text(json.dumps({"seconds": seconds, "scores": scores, "chance": chance_note,
                                                      "plots": [str(p) for p in plots]}, indent=1))
    return text_md, plots


def main(args) -> int:
    from megavlm.parallel.state import Parallel  # megatron-core: only when training

    t0 = time.perf_counter()
    config = Path(args.config or DEFAULT_CONFIG)
    overrides = list(args.overrides or [])
    run_dir = Path(args.run_dir).resolve()
    base = load_config(config, overrides + [f"run_dir={run_dir}"])
    r = roles(base)
    prepare_recipe(base, progress=True)  # the data first; training only reads it
    parallel = Parallel.initialize(base.parallel, base.seed)
    try:
        branches = train_chain(config, overrides, run_dir, parallel)
    finally:
        parallel.destroy()
    scores = evaluate_branches(branches, r.sft, base.data.root, getattr(args, "eval_limit", None))
    seconds = time.perf_counter() - t0
    md, plots = write_outputs(run_dir, base, branches, scores, seconds)
    print(f"\nmegavlm demo finished in {seconds:.0f} s — run directory {run_dir}\n")
    print(md)
    return 0
