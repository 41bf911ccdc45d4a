"""Figures: the sweep's stable-score plots (the paper's Figures 4-8) and the demo's curves.

:func:`paper_figures` draws a sweep's cells the way the paper does (its x axes in percent, vision
green and text blue, the 100 % point of Fig. 4 hollow, one benchmark of each kind beside the
stable scores); :func:`sweep_figures` is the compact per-variable overview.

Sweep figures put the swept variable on x and the stable score on y, vision and text in two
panels, one line per fine-tuning epoch count (mean over seeds, error bars = sample std, the seeds
themselves as faint dots). Demo figures show each stage's loss, and the learning rate over the
tokens of the whole chain, so a branch whose image stage continues the text cosine from 80 % is
visibly different from one that re-warms after 100 %.

matplotlib is imported inside the functions (Agg backend): nothing here needs a display.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from megavlm.experiment.grid import ORDER
from megavlm.experiment.results import PAPER_FIGURES, figure_groups, figure_series
from megavlm.run_folder import METRICS

LABELS = {"fraction": "start checkpoint (fraction of the text schedule)",
          "image_ratio": "image-caption share of image-stage tokens",
          "instruct_ratio": "instruction share of image-stage tokens",
          "epochs": "fine-tuning epochs"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mean_std(vals: Sequence[float]) -> tuple[float, float]:
    m = sum(vals) / len(vals)
    sd = (sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
    return m, sd


def sweep_figures(rows: Sequence[dict], grid: dict[str, list], out_dir: Path) -> list[Path]:
    """One figure per swept variable (more than one value): ``sweep_<variable>.png``.

    Lines are per epoch count; when other variables are swept too, each of their combinations is
    its own line (labelled), so no point averages over anything but seeds."""
    plt = _plt()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    swept = [k for k in ("fraction", "image_ratio", "instruct_ratio", "epochs") if len(grid.get(k, [])) > 1]
    for x in swept:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        others = [k for k in ORDER if k not in ("seed", x) and len(grid.get(k, [])) > 1]
        if x != "epochs" and "epochs" not in others:
            others = ["epochs"] + others
        lines: dict[tuple, dict] = {}
        for r in rows:
            lines.setdefault(tuple(r[k] for k in others), {}).setdefault(r[x], []).append(r)
        for ax, score, title in ((axes[0], "vision_stable", "vision"), (axes[1], "text_stable", "text")):
            for key, pts in sorted(lines.items()):
                xs = sorted(pts)
                stats = [_mean_std([r[score] for r in pts[v]]) for v in xs]
                label = ", ".join(f"{k}={v:g}" for k, v in zip(others, key)) or None
                h = ax.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3,
                                label=label)
                for v in xs:
                    ax.scatter([v] * len(pts[v]), [r[score] for r in pts[v]], s=10, alpha=0.35,
                               color=h[0].get_color())
            ax.set_title(f"{title} stable score")
            ax.set_xlabel(LABELS.get(x, x))
            ax.set_ylabel("mean (accuracy − chance)")
            ax.axhline(0.0, color="grey", lw=0.8, ls=":")
            ax.grid(alpha=0.3)
        if any(lines.keys()) and others:
            axes[1].legend(fontsize=8)
        n_seeds = len(grid.get("seed", [1]))
        fig.suptitle(f"stable score vs {x} (mean ± std over {n_seeds} seed{'s' if n_seeds != 1 else ''})")
        fig.tight_layout()
        p = out_dir / f"sweep_{x}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


# ------------------------------------------------------------------ the paper's figures


VISION_COLOR, TEXT_COLOR = "tab:green", "tab:blue"
"""The paper draws vision results green and text results blue (Figs. 4-8)."""
PREFERRED_TASKS = {"vision": ("vqav2", "vqa_v2", "fashion_vqa"), "text": ("arc_easy", "megavlm_wordnet_mc")}
"""The per-benchmark panel's tasks, as Fig. 4 (right) plots VQA-v2 and ARC-easy; the first one
present in the results (else the first task of that kind)."""


def _pick_task(rows: Sequence[dict], kind: str) -> Optional[str]:
    tasks = sorted({k.split(":", 1)[1] for r in rows for k in r if k.startswith(f"{kind}:")})
    for t in PREFERRED_TASKS[kind]:
        if t in tasks:
            return t
    return tasks[0] if tasks else None


def paper_figures(rows: Sequence[dict], grid: dict[str, list], out_dir: Path, *,
                  scale_note: str = "") -> list[Path]:
    """The paper's Figures 4-8 from a sweep's cells, one file per swept variable it varies
    (``fig4_fraction.png`` ...; Fig. 6 where cells at fraction 0 vary the image ratio).

    Left panel: the vision and text stable scores (green, blue) against the paper's x axis; right
    panel: one vision and one text benchmark's accuracy (as Fig. 4's VQA-v2 and ARC-easy). Points
    are means over seeds, error bars the sample std, the seeds faint dots. On Fig. 4 the 100 %
    point is a hollow circle: it re-warms its LR instead of continuing (the paper's marking).
    ``scale_note`` (e.g. "toy scale") goes into every title."""
    plt = _plt()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    vtask, ttask = _pick_task(rows, "vision"), _pick_task(rows, "text")
    for variable, fig_key, rs in figure_groups(rows, grid):
        stem, xlabel = PAPER_FIGURES[fig_key]
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        panels = ((axes[0], (("vision_stable", "vision stable score", VISION_COLOR),
                             ("text_stable", "text stable score", TEXT_COLOR)), "stable score (accuracy − chance)"),
                  (axes[1], tuple((f"{k}:{t}", t, c) for k, t, c in (("vision", vtask, VISION_COLOR),
                                                                      ("text", ttask, TEXT_COLOR)) if t),
                   "accuracy"))
        styles = ("-", "--", ":", "-.")
        for ax, series, ylabel in panels:
            for score, name, color in series:
                for i, (key, pts) in enumerate(figure_series(rs, grid, variable, score).items()):
                    label = name + (" (" + ", ".join(f"{k}={v:g}" for k, v in key) + ")" if key else "")
                    xs = [p[0] for p in pts]
                    ax.errorbar(xs, [p[1] for p in pts], yerr=[p[2] for p in pts], color=color,
                                ls=styles[i % len(styles)], marker="o", capsize=3, label=label)
                    for p in pts:
                        ax.scatter([p[0]] * len(p[4]), p[4], s=10, alpha=0.35, color=color)
                    if variable == "fraction":  # the re-warmed 100 % point, hollow as in Fig. 4
                        for p in pts:
                            if abs(p[0] - 100.0) < 1e-9:
                                ax.plot([p[0]], [p[1]], "o", ms=9, mfc="white", mec=color, zorder=5)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if series:
                ax.legend(fontsize=7)
        axes[0].axhline(0.0, color="grey", lw=0.8, ls=":")
        axes[1].set_title("per benchmark")
        axes[0].set_title("stable scores")
        n_seeds = len(grid.get("seed", [1]))
        note = f" — {scale_note}" if scale_note else ""
        fig.suptitle(f"{xlabel.split(':')[0]}: mean ± std over {n_seeds} seed{'s' if n_seeds != 1 else ''}{note}")
        fig.tight_layout()
        p = out_dir / f"{stem}.png"
        tmp = out_dir / f"{stem}.tmp.png"
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        tmp.replace(p)
        paths.append(p)
    return paths


def read_metrics(run_dir: Path) -> dict[str, list[dict]]:
    """``metrics.jsonl`` of a run directory, grouped by stage in step order."""
    out: dict[str, list[dict]] = {}
    path = Path(run_dir) / METRICS
    if path.is_file():
        for line in path.read_text().splitlines():
            m = json.loads(line)
            out.setdefault(m["stage"], []).append(m)
    for recs in out.values():
        recs.sort(key=lambda m: m["step"])
    return out


def _smooth(ys: Sequence[float], alpha: float = 0.1) -> list[float]:
    out, s = [], None
    for y in ys:
        s = y if s is None else (1 - alpha) * s + alpha * y
        out.append(s)
    return out


def demo_figures(text_metrics: list[dict], branches: dict[str, dict], out_dir: Path,
                 text_tokens: int) -> list[Path]:
    """``loss.png`` (one panel per stage, both branches) and ``lr.png`` (LR over chain tokens).

    ``branches``: name -> {"metrics": {stage: records}, "start_fraction": f, "stages": [image, sft]}.
    In ``lr.png`` each branch's image stage starts at f x the text stage's tokens — the point of the
    checkpoint it resumed from — so the continued cosine and the re-warmed one can be compared."""
    plt = _plt()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(branches)
    stage_names = next(iter(branches.values()))["stages"] if branches else []
    fig, axes = plt.subplots(1, 1 + len(stage_names), figsize=(4.2 * (1 + len(stage_names)), 3.6))
    axes = list(axes) if hasattr(axes, "__len__") else [axes]
    steps = [m["step"] for m in text_metrics]
    axes[0].plot(steps, [m["loss"] for m in text_metrics], alpha=0.3, color="k")
    axes[0].plot(steps, _smooth([m["loss"] for m in text_metrics]), color="k", label="text (shared)")
    axes[0].set_title("stage 1: text pre-training")
    for k, (ax, st) in enumerate(zip(axes[1:], stage_names)):
        for b in names:
            recs = branches[b]["metrics"].get(st, [])
            xs = [m["step"] for m in recs]
            line, = ax.plot(xs, _smooth([m["loss"] for m in recs]), label=b)
            ax.plot(xs, [m["loss"] for m in recs], alpha=0.25, color=line.get_color())
        ax.set_title(f"stage {k + 2}: {st} (per branch)")
        ax.legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    loss_path = out_dir / "loss.png"
    fig.savefig(loss_path, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 4))
    tok, x = 0, []
    for m in text_metrics:
        x.append(tok)
        tok += m["tokens"]
    ax.plot(x, [m["lr"] for m in text_metrics], color="k", label="text pre-training (cosine)")
    for b in names:
        info = branches[b]
        tok = info["start_fraction"] * text_tokens
        color = None
        for k, st in enumerate(info["stages"]):
            recs = info["metrics"].get(st, [])
            xs = []
            for m in recs:
                xs.append(tok)
                tok += m["tokens"]
            line, = ax.plot(xs, [m["lr"] for m in recs], ls="-" if k == 0 else "--", color=color,
                            label=f"{b}: {st}")
            color = line.get_color()
        ax.axvline(info["start_fraction"] * text_tokens, color=color, lw=0.8, ls=":")
    ax.set_xlabel("tokens seen along the chain")
    ax.set_ylabel("learning rate")
    ax.set_title("LR: image stage continued from the 80 % checkpoint vs re-warmed after 100 %")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    lr_path = out_dir / "lr.png"
    fig.savefig(lr_path, dpi=110)
    plt.close(fig)
    return [loss_path, lr_path]
