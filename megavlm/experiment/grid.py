"""The paper's experiment grid: which variables can be swept, what each value does to a recipe.

A recipe swept here has the paper's stages in order — text pre-training, image-text
pre-training started from a checkpoint of the text stage, instruction fine-tuning started from
the end of the image stage (launch/configs/tiny.yaml is one) — or, as the paper's 1B experiment
(launch/configs/paper-1b.yaml), only the last two, the image stage starting from an *imported*
text checkpoint (``init.path``, the schedule it was trained on in ``schedule.source``). There
``fraction`` picks the imported checkpoint: its path comes from a pattern (``{pct}`` = the
fraction in whole percent, ``{fraction}`` = the fraction as written; default: the recipe's
``init.path`` with its percent replaced, e.g. ``dclm-1b-80pct`` -> ``dclm-1b-{pct}pct``) and its
place on the source schedule is ``schedule.source.fraction``. A *cell* is one value per variable;
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
    """Names of the recipe's stages; ``text`` is None when the image stage starts from an imported
    checkpoint (``init.path``) instead of a text stage of the recipe."""

    text: Optional[str]
    image: str
    sft: str

    @property
    def imported(self) -> bool:
        return self.text is None


def roles(run: RunConfig) -> Roles:
    """The stages of a sweepable recipe, checked to chain the way the paper's do: text -> image ->
    fine-tuning, or image (from an imported checkpoint, ``init.path``) -> fine-tuning."""
    names = [s.name for s in run.stages]
    if len(run.stages) == 2:
        i, s = run.stages
        if i.init.path is None or i.init.stage is not None:
            raise GridError(f"a 2-stage recipe {names} is swept when its first stage {i.name} starts from "
                            f"an imported checkpoint (stages.{i.name}.init.path); it has none")
        if s.init.stage != i.name:
            raise GridError(f"stage {s.name} must start from a checkpoint of {i.name} (init.stage)")
        return Roles(None, i.name, s.name)
    if len(run.stages) != 3:
        raise GridError(f"a sweep needs a recipe with 3 stages (text, image-text, instructions) or 2 "
                        f"(image-text from an imported checkpoint, instructions); this one has {names}")
    t, i, s = run.stages
    if i.init.stage != t.name:
        raise GridError(f"stage {i.name} must start from a checkpoint of {t.name} (init.stage)")
    if s.init.stage != i.name:
        raise GridError(f"stage {s.name} must start from a checkpoint of {i.name} (init.stage)")
    return Roles(t.name, i.name, s.name)


def import_fraction(run: RunConfig) -> float:
    """Where the imported checkpoint of a 2-stage recipe stands on its source schedule: 0.0 = no
    checkpoint (random init), ``schedule.source.fraction`` (or the fraction the checkpoint's
    meta.json records) for a continue, 1.0 for a re-warmed start."""
    img = run.stage(roles(run).image)
    if img.init.path is None:
        return 0.0
    if img.schedule.kind != "continue":
        return 1.0
    if img.schedule.source is not None:
        return float(img.schedule.source.fraction)
    from megavlm.train.plan import read_checkpoint_source

    return float(read_checkpoint_source(img.init.path)["fraction"])


def default_import_pattern(run: RunConfig) -> str:
    """The recipe's ``init.path`` with the percent of its fraction replaced by ``{pct}``
    (``.../dclm-1b-80pct`` at fraction 0.8 -> ``.../dclm-1b-{pct}pct``)."""
    import re

    img = run.stage(roles(run).image)
    path, f = img.init.path, import_fraction(run)
    pct = _pct(f)
    hits = [m for m in re.finditer(r"\d+", path) if m.group() == pct]
    if len(hits) != 1:
        raise GridError(f"stages.{img.name}.init.path={path!r} does not name its fraction {f:g} as "
                        f"'{pct}' exactly once, so the other fractions' checkpoints cannot be derived "
                        "from it: pass --import-path PATTERN with {pct} (whole percent) or {fraction}")
    m = hits[0]
    return path[:m.start()] + "{pct}" + path[m.end():]


def _pct(f: float) -> str:
    return str(int(round(100 * f)))


def import_path(pattern: str, fraction: float) -> str:
    """The imported checkpoint at ``fraction`` under ``pattern``."""
    if "{pct}" not in pattern and "{fraction}" not in pattern:
        raise GridError(f"--import-path {pattern!r} names no {{pct}} or {{fraction}}: every fraction "
                        "would import the same checkpoint")
    return pattern.replace("{pct}", _pct(fraction)).replace("{fraction}", f"{fraction:g}")


def source_final(run: RunConfig) -> float:
    """The final LR of the schedule the imported checkpoint was trained on (where a re-warmed
    branch decays to, as the 3-stage branches decay to the text stage's final LR)."""
    img = run.stage(roles(run).image)
    if img.schedule.source is not None:
        return float(img.schedule.source.final)
    if img.schedule.kind == "continue" and img.init.path is not None:
        from megavlm.train.plan import read_checkpoint_source

        return float(read_checkpoint_source(img.init.path)["final"])
    return float(img.schedule.final)


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
    fraction = import_fraction(run) if r.imported else img.init.fraction
    return {"seed": [run.seed], "fraction": [fraction], "image_ratio": [img.mixture.captions],
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


def validate(run: RunConfig, grid: dict[str, list], import_pattern: Optional[str] = None) -> dict[str, list]:
    """Check every variable and value against the recipe; return the full grid (defaults filled).

    Errors list the valid choices: the known variables, the text stage's checkpoint fractions (a
    recipe importing its text checkpoint takes any fraction in [0, 1]; whether each checkpoint is
    there is :func:`missing_imports`' question, asked before a sweep runs)."""
    unknown = sorted(set(grid) - set(VARIABLES))
    if unknown:
        raise GridError(f"unknown grid variable(s) {unknown}; valid: "
                        + "; ".join(f"{k} ({v})" for k, v in VARIABLES.items()))
    r = roles(run)
    saved = [] if r.imported else sorted(run.stage(r.text).checkpoint_fractions)
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
            if name == "fraction" and r.imported and not 0.0 <= v <= 1.0:
                raise GridError(f"fraction={v:g} is outside [0, 1] (the imported checkpoint's place on "
                                "its source schedule)")
            if (name == "fraction" and not r.imported and v != 0.0
                    and not any(abs(v - f) < 1e-9 for f in saved)):
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
        load_config(raw=_raw(run), overrides=cell_overrides(run, c, epochs=1, import_pattern=import_pattern))
    return full


def missing_imports(run: RunConfig, full: dict[str, list], import_pattern: Optional[str] = None) -> list[str]:
    """The imported checkpoints the grid's fractions name that are not there (empty for a recipe
    that trains its own text stage)."""
    if not roles(run).imported:
        return []
    out = []
    img = run.stage(roles(run).image)
    for f in full["fraction"]:
        if f <= 0.0:
            continue
        path = branch_import_path(run, f, import_pattern)
        if not Path(path).expanduser().is_dir():
            out.append(path)
        elif f < 1.0 - 1e-9 and img.schedule.source is None:  # the fraction comes from its meta.json
            from megavlm.train.plan import read_checkpoint_source

            got = float(read_checkpoint_source(path)["fraction"])
            if abs(got - f) > 1e-3:
                out.append(f"{path} (its meta.json stands at fraction {got:g}, not {f:g})")
    return out


def branch_import_path(run: RunConfig, fraction: float, import_pattern: Optional[str] = None) -> str:
    """The checkpoint a branch at ``fraction`` imports: the recipe's own ``init.path`` at the
    recipe's fraction (no pattern needed), else ``import_pattern`` (default
    :func:`default_import_pattern`) filled in."""
    img = run.stage(roles(run).image)
    if import_pattern is None and img.init.path is not None and abs(fraction - import_fraction(run)) < 1e-9:
        return img.init.path
    return import_path(import_pattern or default_import_pattern(run), fraction)


def cells(full: dict[str, list]) -> list[Cell]:
    """Every combination, in a stable order (seed outermost, epochs innermost)."""
    return [Cell(*combo) for combo in itertools.product(*(full[k] for k in ORDER))]


def _raw(run: RunConfig) -> dict:
    return json.loads(json.dumps(run.to_dict()))


def branch_overrides(run: RunConfig, fraction: float, rewarm_peak: Optional[float] = None,
                     rewarm_warmup: float = 0.05, import_pattern: Optional[str] = None) -> list[str]:
    """Overrides that start the image stage at ``fraction`` of the text stage.

    ``0 < f < 1``: the text cosine continues from that point (the paper's recommendation).
    ``1.0``: the paper's baseline, a re-warmed cosine; ``0.0``: the image stage from random
    initialisation (the paper's 0 %, Sec. 3.3), re-warmed the same way. Both re-warm to peak
    ``rewarm_peak`` (default :data:`REWARM_PEAK` = 3e-3, paper line 149; warmup ``rewarm_warmup``
    of the stage) down to the text stage's final LR.

    A recipe importing its text checkpoint (``init.path``): ``0 < f < 1`` imports the checkpoint
    at f (``import_pattern``, default :func:`default_import_pattern`) and continues its source
    schedule from f (``schedule.source.fraction``); 1.0 imports the finished one and re-warms to
    the source's final LR; 0.0 starts from random weights, re-warmed."""
    r = roles(run)
    if r.imported:
        return _imported_branch(run, fraction, rewarm_peak, rewarm_warmup, import_pattern)
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


def _imported_branch(run: RunConfig, fraction: float, rewarm_peak: Optional[float], rewarm_warmup: float,
                     import_pattern: Optional[str]) -> list[str]:
    r = roles(run)
    img = run.stage(r.image)
    pre = f"stages.{r.image}"
    final = source_final(run)
    if fraction == 0.0:
        out = [f"{pre}.init.path=null"]
    else:
        out = [f"{pre}.init.path={branch_import_path(run, fraction, import_pattern)}"]
    if 0.0 < fraction < 1.0 - 1e-9:
        out += [f"{pre}.schedule.kind=continue"]
        if img.schedule.source is None:
            if img.schedule.kind != "continue":
                raise GridError(f"fraction={fraction:g} continues the imported checkpoint's schedule, but "
                                f"stages.{r.image} states no schedule.source (its schedule is {img.schedule.kind})")
            return out  # the checkpoint's meta.json records its schedule and fraction
        return out + [f"{pre}.schedule.source.fraction={fraction!r}"]
    peak = rewarm_peak if rewarm_peak is not None else REWARM_PEAK
    return out + [f"{pre}.schedule.kind=rewarm", f"{pre}.schedule.source=null", f"{pre}.schedule.peak={peak!r}",
                  f"{pre}.schedule.final={final!r}", f"{pre}.schedule.warmup_fraction={rewarm_warmup!r}"]


def cell_overrides(run: RunConfig, cell: Cell, epochs: Optional[int] = None,
                   rewarm_peak: Optional[float] = None, import_pattern: Optional[str] = None) -> list[str]:
    """The dotted overrides that turn the recipe into this cell's chain.

    ``epochs`` sets the fine-tuning stage's ``epochs`` (its budget then follows from its data at
    its own row length, megavlm.train.budget); None leaves the fine-tuning stage as it is."""
    r = roles(run)
    img = f"stages.{r.image}.mixture"
    text_share = round(1.0 - cell.image_ratio - cell.instruct_ratio, 12)
    out = [f"seed={cell.seed}"] + branch_overrides(run, cell.fraction, rewarm_peak, import_pattern=import_pattern)
    out += [f"{img}.text={text_share!r}", f"{img}.captions={cell.image_ratio!r}",
            f"{img}.instructions={cell.instruct_ratio!r}"]
    if epochs is not None:
        out += [f"stages.{r.sft}.epochs={int(epochs)}"]
    return out
