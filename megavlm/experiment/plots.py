"""Figures: the sweep's stable-score plots (the paper's Figures 4-8) and the demo's curves.

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
from typing import Sequence

from megavlm.experiment.grid import ORDER
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
