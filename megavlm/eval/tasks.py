"""Evaluation specs by name or file, and the task-name checks run before any model is loaded.

An evaluation spec says which lm-eval tasks are scored and with which of lm-eval's metrics, which
vision suite (the paper's, from a data root, or the offline one) with which tasks, and which chance
table the stable score subtracts. It comes from

* a preset name: ``paper-table7`` / ``paper-table8`` / ``appendix-e`` (:data:`SPEC_PRESETS`): the
  tasks, their metric and the chance table of megavlm.eval.stable_score.PRESETS of that name;
* a spec file (YAML or JSON), or a recipe's ``eval:`` section (megavlm.config.EvalConfig, kept in
  every checkpoint's config.yaml: :func:`recorded_spec`), of this shape::

      preset: paper-table7            # optional base: its tasks, metrics and chance
      text_tasks: [hellaswag:acc_norm, arc_easy]   # TASK or TASK:METRIC (lm-eval's metric key)
      chance: paper-table7            # chance preset of the stable score
      include_path: my_lm_eval_tasks  # folder of local lm-eval YAML tasks
      vision: {suite: paper, data_root: /data/bench, tasks: [vqav2, gqa], strict: false}
      limit: 100

:func:`check_spec` checks every text task name against the installed lm-eval (its TaskManager,
with the spec's ``include_path``), every paper-suite task against megavlm.eval.paper.TASK_NAMES
and every task's chance entry, so that a misspelt or unknown task is one error naming it before a
checkpoint is loaded (megavlm.eval.api.evaluate calls it first).

Metrics: lm-eval reports several per task; the stable score reads ``acc`` except where
:data:`TEXT_METRICS` says otherwise. HellaSwag is read as ``acc_norm`` (length-normalised), the
metric the paper's HellaSwag values fit.

BigBench CS (Table 7): the paper's "BigBench CS" column is DCLM's ``bigbench_cs_algorithms``, a
language-modelling-format task (LCS lengths and valid-parentheses, scored on the exact
continuation; DCLM's random baseline 0). lm-eval 0.4.13 has no such task: its
``bigbench_cs_algorithms_multiple_choice`` keeps only the rows with multiple-choice targets (another
question set, another format) and ``bigbench_cs_algorithms_generate_until`` scores free generation
by exact match; neither measures what the paper measured, and the chance the published stable
scores imply (0.25) belongs to neither. The ``paper-table7`` preset therefore runs Table 7's other
eight tasks; docs/reproduction.md says so.
"""

from __future__ import annotations

import difflib
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from megavlm.eval.runner import EvalError
from megavlm.eval.stable_score import PRESETS, TEXT_TASKS, chance as chance_of

TEXT_METRICS: dict[str, str] = {"hellaswag": "acc_norm"}
"""lm-eval metric read per task where it is not ``acc`` (HellaSwag: length-normalised accuracy)."""

VISION_SUITES = ("paper", "offline")


@dataclass(frozen=True)
class TextTask:
    """An lm-eval task and the metric of its results read as its accuracy."""

    name: str
    metric: Optional[str] = None
    """None: ``acc``, else ``exact_match`` / ``acc_norm``, whichever lm-eval reports (megavlm.eval.text)."""

    @classmethod
    def parse(cls, item: Any) -> "TextTask":
        """``"task"``, ``"task:metric"`` or ``{"name": task, "metric": metric}``."""
        if isinstance(item, Mapping):
            if "name" not in item or set(item) - {"name", "metric"}:
                raise EvalError(f"text task {dict(item)!r}: expected {{name, metric}}")
            return cls.of(str(item["name"]), item.get("metric"), None)
        if not isinstance(item, str) or not item.strip():
            raise EvalError(f"text task {item!r}: expected TASK or TASK:METRIC")
        name, _, metric = item.strip().partition(":")
        return cls.of(name, metric or None, None)

    @classmethod
    def of(cls, name: str, metric: Optional[str] = None, default: Optional[str] = "acc") -> "TextTask":
        return cls(name, metric or TEXT_METRICS.get(name, default))


@dataclass(frozen=True)
class BenchmarkSpec:
    """A complete named spec: text tasks with metrics, the paper-suite vision tasks, the chance preset."""

    name: str
    text: tuple[TextTask, ...]
    vision: tuple[str, ...]
    chance: str

    @property
    def metrics(self) -> dict[str, str]:
        return {t.name: t.metric for t in self.text if t.metric}


def _preset_spec(name: str) -> BenchmarkSpec:
    p = PRESETS[name]
    return BenchmarkSpec(name, tuple(TextTask.of(t) for t in p.text_tasks), tuple(p.vision_tasks), name)


SPEC_PRESETS: dict[str, BenchmarkSpec] = {n: _preset_spec(n) for n in ("paper-table7", "paper-table8", "appendix-e")}


# --------------------------------------------------------------------------------------------
# checks


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: Optional[str] = None):
    try:
        from lm_eval.tasks import TaskManager  # the eval extra; indexes its YAML files, loads no data
    except ImportError as e:
        raise EvalError(f"lm-eval is not installed ({e}); pip install 'megavlm[eval]'") from None
    import logging

    logging.getLogger("lm-eval").setLevel(logging.WARNING)
    return TaskManager(include_path=include_path, include_defaults=True)


def known_text_tasks(include_path: Optional[str] = None) -> frozenset[str]:
    """Every task (and group / tag) name the installed lm-eval knows, with ``include_path``'s."""
    return frozenset(_task_manager(include_path).all_tasks)


def task_metrics(name: str, include_path: Optional[str] = None) -> Optional[list[str]]:
    """The metrics lm-eval's config of task ``name`` lists (None where it lists none: groups, tags)."""
    entry = _task_manager(include_path).task_index.get(name)
    cfg = getattr(entry, "cfg", None) or {}
    listed = [m.get("metric") for m in cfg.get("metric_list") or () if isinstance(m, Mapping)]
    return listed or None


def check_text_tasks(names: Sequence[str], include_path: Optional[str | Path] = None,
                     metrics: Optional[Mapping[str, str]] = None) -> None:
    """An error naming every task the installed lm-eval does not know (with the closest names), or
    whose metric (``metrics``, default :data:`TEXT_METRICS`) its lm-eval config does not list."""
    if include_path is not None and not Path(include_path).is_dir():
        raise EvalError(f"{include_path}: no such folder of local lm-eval tasks (include_path)")
    inc = str(include_path) if include_path else None
    known = known_text_tasks(inc)
    unknown = [t for t in names if t not in known]
    if unknown:
        import lm_eval

        hints = "; ".join(f"{t}: did you mean {', '.join(c)}?" for t in unknown
                          if (c := difflib.get_close_matches(t, sorted(known), n=3, cutoff=0.6)))
        raise EvalError(f"lm-eval does not know the task(s) {unknown} (installed lm-eval "
                        f"{getattr(lm_eval, '__version__', '?')}" + (f"; {hints}" if hints else "") + ")"
                        + (f" (local tasks in {include_path}: "
                           f"{sorted(p.stem for p in Path(include_path).glob('*.yaml'))})" if include_path else ""))
    for t in names:
        m = (metrics or {}).get(t) or TEXT_METRICS.get(t)
        listed = task_metrics(t, inc) if m else None
        if listed is not None and m not in listed:
            raise EvalError(f"lm-eval task {t} reports {listed}, not the metric {m!r} asked for")


def check_vision_tasks(names: Sequence[str]) -> None:
    from megavlm.eval.paper import TASK_NAMES

    unknown = [t for t in names if t not in TASK_NAMES]
    if unknown:
        raise EvalError(f"unknown paper-suite task(s) {unknown}; known: {list(TASK_NAMES)}")


def check_chance(names: Sequence[str], preset: str) -> None:
    missing = []
    for t in names:
        try:
            chance_of(t, preset)
        except KeyError:
            missing.append(t)
    if missing:
        raise EvalError(f"chance preset {preset!r} has no chance level for task(s) {missing}; add them to "
                        f"megavlm.eval.stable_score.CHANCE (or choose another preset)")


def check_spec(spec) -> None:
    """Every name an EvalSpec (megavlm.eval.api) asks for, checked before a model is loaded."""
    from megavlm.eval.paper import TASK_NAMES

    # the text evaluate runs: the named tasks, else the paper's nine with the paper suite and no suite
    text = list(spec.text_tasks or (TEXT_TASKS if spec.suite is None and spec.paper_root is not None else ()))
    if text:
        check_text_tasks(text, spec.include_path, spec.text_metrics)
        check_chance(text, spec.chance)
    stray = sorted(set(spec.text_metrics or {}) - set(text))
    if stray:
        raise EvalError(f"text metric(s) given for task(s) {stray} that are not scored (tasks: {text})")
    if spec.paper_root is not None:
        vis = list(spec.paper_tasks or TASK_NAMES)
        check_vision_tasks(vis)
        check_chance(vis, spec.chance)


# --------------------------------------------------------------------------------------------
# specs from presets, files and recipes

SPEC_KEYS = {"preset", "text_tasks", "chance", "include_path", "vision", "limit"}
VISION_KEYS = {"suite", "data_root", "tasks", "strict"}


def read_spec_source(source: str | Path | Mapping) -> dict:
    """A preset name, a spec file (YAML / JSON; a recipe's ``eval:`` section) or a mapping -> mapping."""
    if isinstance(source, Mapping):
        raw = dict(source)
    elif str(source) in SPEC_PRESETS:
        return {"preset": str(source)}
    else:
        path = Path(source)
        if not path.is_file():
            raise EvalError(f"{source}: neither an evaluation preset ({', '.join(SPEC_PRESETS)}) nor a spec file")
        text = path.read_text()
        try:
            if path.suffix == ".json":
                raw = json.loads(text)
            else:
                import yaml

                raw = yaml.safe_load(text)
        except Exception as e:  # yaml / json syntax errors
            raise EvalError(f"{path}: not a readable evaluation spec ({e})") from None
        if not isinstance(raw, Mapping):
            raise EvalError(f"{path}: an evaluation spec is a mapping, got {type(raw).__name__}")
        raw = dict(raw)
        if "eval" in raw and not (set(raw) <= SPEC_KEYS):  # a recipe: its eval: section
            raw = raw["eval"]
            if not isinstance(raw, Mapping):
                raise EvalError(f"{path}: its eval: section is not a mapping")
            raw = dict(raw)
    bad = set(raw) - SPEC_KEYS
    if bad:
        raise EvalError(f"evaluation spec: unknown key(s) {sorted(bad)}; known: {sorted(SPEC_KEYS)}")
    if "vision" in raw:
        v = raw["vision"] or {}
        if not isinstance(v, Mapping) or set(v) - VISION_KEYS:
            raise EvalError(f"evaluation spec: vision must be a mapping of {sorted(VISION_KEYS)}, got {v!r}")
        if (v.get("suite") or "paper") not in VISION_SUITES:
            raise EvalError(f"evaluation spec: vision.suite {v.get('suite')!r} is not one of {list(VISION_SUITES)}")
    if raw.get("preset") is not None and raw["preset"] not in SPEC_PRESETS:
        raise EvalError(f"evaluation spec: unknown preset {raw['preset']!r}; known: {list(SPEC_PRESETS)}")
    return raw


def recorded_spec(checkpoint: str | Path) -> Optional[dict]:
    """The ``eval:`` section of a checkpoint's run config (config.yaml, megavlm.config.EvalConfig)
    when it sets anything, else None (the run is scored on the offline suites)."""
    import yaml

    from megavlm.checkpoint_format import resolve_checkpoint
    from megavlm.run_folder import CONFIG

    try:
        path = resolve_checkpoint(checkpoint) / CONFIG
    except Exception:  # not a checkpoint: loading it says so
        return None
    if not path.is_file():
        return None
    section = (yaml.safe_load(path.read_text()) or {}).get("eval") or {}
    vision = {k: v for k, v in (section.get("vision") or {}).items() if v not in (None, False)}
    out = {k: v for k, v in section.items() if k != "vision" and v is not None}
    if vision:
        out["vision"] = vision
    return out if set(out) - {"limit", "include_path"} else None


def spec_fields(source: str | Path | Mapping, *, data_root: Optional[str | Path] = None,
                vision_suite: Optional[str] = None) -> dict:
    """The megavlm.eval.api.EvalSpec fields a spec source sets: ``text_tasks``, ``text_metrics``,
    ``chance``, ``include_path``, ``paper_root``, ``paper_tasks``, ``strict``, ``limit`` (when
    given). ``data_root`` / ``vision_suite`` (command-line flags) override the spec's ``vision``.
    A spec whose vision suite is the paper's needs a data root: an error here, not after loading."""
    raw = read_spec_source(source)
    base = SPEC_PRESETS.get(raw.get("preset")) if raw.get("preset") else None
    text = ([TextTask.parse(t) for t in raw["text_tasks"]] if raw.get("text_tasks") is not None
            else list(base.text) if base else None)
    vis = dict(raw.get("vision") or {})
    suite = vision_suite or vis.get("suite") or ("paper" if base else None)
    out: dict[str, Any] = {"chance": raw.get("chance") or (base.chance if base else None)}
    if out["chance"] is not None and out["chance"] not in PRESETS:
        raise EvalError(f"evaluation spec: unknown chance preset {out['chance']!r}; known: {sorted(PRESETS)}")
    if out["chance"] is None:
        del out["chance"]
    if text is not None:
        out["text_tasks"] = [t.name for t in text]
        out["text_metrics"] = {t.name: t.metric for t in text if t.metric}
    if raw.get("include_path"):
        out["include_path"] = raw["include_path"]
    if raw.get("limit") is not None:
        out["limit"] = int(raw["limit"])
    if suite == "paper":
        root = data_root or vis.get("data_root")
        if not root:
            name = raw.get("preset") or "the spec"
            raise EvalError(f"{name} scores the paper's vision suite: give its data root (--data-root DIR or "
                            f"vision.data_root), or the offline vision suite (--suite offline)")
        out["paper_root"] = str(root)
        tasks = vis.get("tasks") or (list(base.vision) if base else None)
        if tasks:
            check_vision_tasks(tasks)
            out["paper_tasks"] = list(tasks)
        out["strict"] = bool(vis.get("strict", False))
    return out
