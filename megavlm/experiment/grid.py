"""The paper's experiment grid: which variables can be swept, what each value does to a recipe.

A recipe swept here has the paper's three stages in order — text pre-training, image-text
pre-training started from a checkpoint of the text stage, instruction fine-tuning started from
the end of the image stage (launch/configs/tiny.yaml is one). A *cell* is one value per variable;
it becomes dotted overrides of that recipe, so every cell is validated by the same typed config
as any run, before anything trains.

Variables (the paper's Figures 4-8):

* ``fraction``: the text checkpoint the image stage starts from. ``1.0`` is the paper's baseline —
  the finished text model with a re-warmed cosine; ``< 1`` continues the text cosine from there.
* ``image_ratio``: fraction of the image stage's token positions from image-caption samples.
* ``instruct_ratio``: fraction of the image stage's positions from instruction conversations.
  The rest of the image stage is plain text.
* ``epochs``: passes over the instruction data in fine-tuning.
* ``seed``: weights and data order of the whole chain.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from megavlm.config import ConfigError, RunConfig, load_config

VARIABLES: dict[str, str] = {
    "fraction": "text checkpoint the image stage starts from (1.0 = re-warmed baseline, < 1 = continued, "
                "0.0 = random initialisation, re-warmed)",
    "image_ratio": "image-caption fraction of the image stage's token positions, in [0, 1]",
    "instruct_ratio": "instruction fraction of the image stage's token positions, in [0, 1]",
    "epochs": "instruction fine-tuning epochs (a positive integer)",
    "seed": "seed of weights and data order (an integer)",
}
REWARM_PEAK = 3e-3
"""Peak LR of the re-warmed 0 % and 100 % branches: "for 0% and 100% the learning rate would be too
low, thus we adopt a linear warmup-cosine decay with a maximum learning rate of 3x10^-3" (paper
line 149). ``megavlm sweep --rewarm-peak`` changes it."""
ORDER = ("seed", "fraction", "image_ratio", "instruct_ratio", "epochs")
"""Variables in the order they enter the chain (a job key is a prefix of this order)."""


class GridError(ConfigError):
    """A grid that cannot run: unknown variable, impossible value, or a recipe of the wrong shape."""


@dataclass(frozen=True)
class Roles:
    """Names of the recipe's three stages."""

    text: str
    image: str
    sft: str


def roles(run: RunConfig) -> Roles:
    """The three stages of a sweepable recipe, checked to chain the way the paper's do."""
    if len(run.stages) != 3:
        raise GridError(f"a sweep needs a recipe with 3 stages (text, image-text, instructions); "
                        f"this one has {[s.name for s in run.stages]}")
    t, i, s = run.stages
    if i.init.stage != t.name:
        raise GridError(f"stage {i.name} must start from a checkpoint of {t.name} (init.stage)")
    if s.init.stage != i.name:
        raise GridError(f"stage {s.name} must start from a checkpoint of {i.name} (init.stage)")
    return Roles(t.name, i.name, s.name)


@dataclass(frozen=True)
class Cell:
    """One point of the grid."""

    seed: int
    fraction: float
    image_ratio: float
    instruct_ratio: float
    epochs: int

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ORDER}

    def key(self, upto: str) -> str:
        """A filesystem-safe name of this cell's variables up to and including ``upto``."""
        short = {"seed": "s", "fraction": "f", "image_ratio": "r", "instruct_ratio": "i", "epochs": "e"}
        names = ORDER[:ORDER.index(upto) + 1]
        return "-".join(f"{short[n]}{_fmt(getattr(self, n))}" for n in names)


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def defaults(run: RunConfig) -> dict[str, list]:
    """What an unswept variable takes: the recipe's own value."""
    r = roles(run)
    img = run.stage(r.image)
    return {"seed": [run.seed], "fraction": [img.init.fraction], "image_ratio": [img.mixture.captions],
            "instruct_ratio": [img.mixture.instructions], "epochs": [run.stage(r.sft).epochs or 1]}


def parse_grid(specs: list[str]) -> dict[str, list]:
    """``--grid`` values: ``name=v1,v2`` (repeatable) or a YAML / JSON file mapping names to lists."""
    out: dict[str, list] = {}
    for spec in specs:
        if "=" in spec:
            name, vals = spec.split("=", 1)
            values = [yaml.safe_load(v) for v in vals.split(",") if v.strip()]
            items = {name.strip(): values}
        else:
            p = Path(spec)
            if not p.is_file():
                raise GridError(f"--grid {spec!r} is neither name=v1,v2 nor a file; variables: "
                                + ", ".join(VARIABLES))
            items = yaml.safe_load(p.read_text()) or {}
            if not isinstance(items, dict):
                raise GridError(f"{p}: a grid file maps variable names to lists of values")
        for name, values in items.items():
            out[name] = values if isinstance(values, list) else [values]
    return out


def validate(run: RunConfig, grid: dict[str, list]) -> dict[str, list]:
    """Check every variable and value against the recipe; return the full grid (defaults filled).

    Errors list the valid choices: the known variables, the text stage's checkpoint fractions."""
    unknown = sorted(set(grid) - set(VARIABLES))
    if unknown:
        raise GridError(f"unknown grid variable(s) {unknown}; valid: "
                        + "; ".join(f"{k} ({v})" for k, v in VARIABLES.items()))
    r = roles(run)
    saved = sorted(run.stage(r.text).checkpoint_fractions)
    full = defaults(run)
    for name, values in grid.items():
        if not values:
            raise GridError(f"grid variable {name} has no values")
        checked = []
        for v in values:
            if name in ("seed", "epochs"):
                if isinstance(v, bool) or not isinstance(v, int) or (name == "epochs" and v < 1):
                    raise GridError(f"{name}={v!r}: {VARIABLES[name]}")
                checked.append(int(v))
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise GridError(f"{name}={v!r} is not a number: {VARIABLES[name]}")
            v = float(v)
            if name == "fraction" and v != 0.0 and not any(abs(v - f) < 1e-9 for f in saved):
                raise GridError(f"fraction={v:g} is not a checkpoint of stage {r.text}; "
                                f"valid: {', '.join(f'{f:g}' for f in saved)}, or 0 (random initialisation)")
            if name in ("image_ratio", "instruct_ratio") and not 0.0 <= v <= 1.0:
                raise GridError(f"{name}={v:g} is outside [0, 1]")
            checked.append(v)
        if len(set(checked)) != len(checked):
            raise GridError(f"grid variable {name} repeats a value: {values}")
        full[name] = checked
    for ir in full["image_ratio"]:
        for jr in full["instruct_ratio"]:
            if ir + jr > 1.0 + 1e-9:
                raise GridError(f"image_ratio={ir:g} + instruct_ratio={jr:g} exceed 1 "
                                f"(the rest of the image stage is text)")
    for kind, name in (("captions", "image_ratio"), ("instructions", "instruct_ratio")):
        if any(v > 0 for v in full[name]) and not getattr(run.data, kind):
            raise GridError(f"{name} > 0 needs data.{kind} datasets; the recipe lists none")
    for c in cells(full):
        load_config(raw=_raw(run), overrides=cell_overrides(run, c, epochs=1))
    return full


def cells(full: dict[str, list]) -> list[Cell]:
    """Every combination, in a stable order (seed outermost, epochs innermost)."""
    return [Cell(*combo) for combo in itertools.product(*(full[k] for k in ORDER))]


def _raw(run: RunConfig) -> dict:
    return json.loads(json.dumps(run.to_dict()))


def branch_overrides(run: RunConfig, fraction: float, rewarm_peak: Optional[float] = None,
                     rewarm_warmup: float = 0.05) -> list[str]:
    """Overrides that start the image stage at ``fraction`` of the text stage.

    ``0 < f < 1``: the text cosine continues from that point (the paper's recommendation).
    ``1.0``: the paper's baseline, a re-warmed cosine; ``0.0``: the image stage from random
    initialisation (the paper's 0 %, Sec. 3.3), re-warmed the same way. Both re-warm to peak
    ``rewarm_peak`` (default :data:`REWARM_PEAK` = 3e-3, paper line 149; warmup ``rewarm_warmup``
    of the stage) down to the text stage's final LR."""
    r = roles(run)
    text = run.stage(r.text).schedule
    pre = f"stages.{r.image}"
    if fraction == 0.0:  # no text checkpoint: fresh weights (init: {})
        out = [f"{pre}.init.stage=null", f"{pre}.init.fraction=null"]
    else:
        out = [f"{pre}.init.fraction={fraction!r}"]
    if 0.0 < fraction < 1.0 - 1e-9:
        return out + [f"{pre}.schedule.kind=continue"]
    peak = rewarm_peak if rewarm_peak is not None else REWARM_PEAK
    return out + [f"{pre}.schedule.kind=rewarm", f"{pre}.schedule.peak={peak!r}",
                  f"{pre}.schedule.final={text.final!r}", f"{pre}.schedule.warmup_fraction={rewarm_warmup!r}"]


def cell_overrides(run: RunConfig, cell: Cell, epochs: Optional[int] = None,
                   rewarm_peak: Optional[float] = None) -> list[str]:
    """The dotted overrides that turn the recipe into this cell's chain.

    ``epochs`` sets the fine-tuning stage's ``epochs`` (its budget then follows from its data at
    its own row length, megavlm.train.budget); None leaves the fine-tuning stage as it is."""
    r = roles(run)
    img = f"stages.{r.image}.mixture"
    text_share = round(1.0 - cell.image_ratio - cell.instruct_ratio, 12)
    out = [f"seed={cell.seed}"] + branch_overrides(run, cell.fraction, rewarm_peak)
    out += [f"{img}.text={text_share!r}", f"{img}.captions={cell.image_ratio!r}",
            f"{img}.instructions={cell.instruct_ratio!r}"]
    if epochs is not None:
        out += [f"stages.{r.sft}.epochs={int(epochs)}"]
    return out
