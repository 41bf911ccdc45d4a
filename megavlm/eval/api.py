"""Evaluation as a library: ``evaluate(checkpoint, EvalSpec(...)) -> Report``.

The one entry that scores a checkpoint and writes its report: ``megavlm eval all`` (megavlm.eval.cli
builds a spec from its flags), the sweep and the demo (megavlm.experiment.scoring) call it with
typed arguments, never an argv. What is asked is all in the spec:

* text: lm-eval tasks by name (``text_tasks``, with an ``include_path`` of local YAML tasks), or the
  text half of a :class:`Suite`;
* vision: the paper's suite from the benchmarks' published files (``paper_root``), or the vision
  half of a :class:`Suite`; plus own question files (``extra_tasks``);
* the question template (``prompt_template``): given explicitly, or ``None`` for the one the
  checkpoint recorded at training (``data.prompt_template``, megavlm.eval.runner.recorded_prompt).
  It is resolved once (:func:`resolve_prompt`) and passed down to every task as an argument; the
  model object never carries it. The report names the template and where it came from.

A :class:`Suite` is an object with ``text(model, workdir, limit)`` and ``vision(model, template=…, …)``:
the offline suites built from the demo's assets are one (megavlm.demo.suites.OfflineSuite). The
caller hands it in, so this package never imports the demo.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Protocol, Sequence, Union

from megavlm.data.indexed import store_prefix
from megavlm.eval import formats, paper, report as reports, vision
from megavlm.eval.distributed import EvalShards
from megavlm.eval.runner import CheckpointModel, EvalError, recorded_prompt
from megavlm.eval.stable_score import DEFAULT_PRESET, PRESETS, TEXT_TASKS
from megavlm.eval.tasks import check_spec, spec_fields
from megavlm.eval.text import run_text, text_accuracies
from megavlm.eval.vision import TaskResult
from megavlm.sinks import log_eval_report


class Suite(Protocol):
    """A text + vision suite evaluation can run (megavlm.demo.suites.OfflineSuite is one)."""

    def text(self, model: CheckpointModel, workdir: Path, limit: Optional[float] = None) -> tuple[dict, dict]:
        """lm-eval's results dict and ``{task: accuracy}``; ``workdir`` is a scratch folder."""

    def vision(self, model: CheckpointModel, *, template: str, limit: Optional[int] = None,
               max_new_tokens: int = 128, shards: Optional[EvalShards] = None) -> list[TaskResult]:
        """One result per task, questions asked as ``template``."""


@dataclass(frozen=True)
class Prompt:
    """The question template a checkpoint is asked with, and where it came from."""

    template: str
    source: str


def resolve_prompt(model: CheckpointModel, template: Optional[str] = None, source: str = "argument") -> Prompt:
    """``template`` when given (it must contain ``{question}``), else the checkpoint's recorded one."""
    if template is None:
        return Prompt(*recorded_prompt(model.run, model.path))
    if "{question}" not in template:
        raise EvalError(f"prompt template {template!r} must contain {{question}}")
    return Prompt(template, source)


@dataclass(frozen=True)
class ExtraTask:
    """An own question file scored as one more vision task: ``task`` names its reader and rule
    (a key of megavlm.eval.formats.READERS except vqav2), ``embeds`` the store of its images."""

    task: str
    questions: str
    embeds: str
    name: str = ""

    def __post_init__(self):
        if self.task not in vision.READERS or self.task == "vqav2":
            raise EvalError(f"extra task {self.task}:{self.questions}: unknown task {self.task!r}; known: "
                            f"{sorted(t for t in vision.READERS if t != 'vqav2')}")
        if not self.name:
            object.__setattr__(self, "name", f"{self.task}:{Path(self.questions).stem}")


@dataclass(frozen=True)
class EvalSpec:
    """What :func:`evaluate` runs on a checkpoint (see the module docstring)."""

    suite: Optional[Suite] = None
    """Text and vision suite used where ``text_tasks`` / ``paper_root`` do not say otherwise."""
    text_tasks: Optional[Sequence[str]] = None
    """lm-eval task names instead of the suite's text (without a suite: the paper's nine)."""
    include_path: Optional[str | Path] = None
    """Folder of local lm-eval YAML tasks that ``text_tasks`` may name."""
    text_metrics: Optional[Mapping[str, str]] = None
    """lm-eval metric read per text task (default megavlm.eval.tasks.TEXT_METRICS, else ``acc``)."""
    paper_root: Optional[str | Path] = None
    """Run the paper's vision suite from the benchmarks' files under this root (megavlm.eval.paper)."""
    paper_tasks: Optional[Sequence[str]] = None
    strict: bool = False
    """Paper suite: a task whose files are absent is an error (else it is skipped and listed)."""
    extra_tasks: Sequence[ExtraTask] = ()
    prompt_template: Optional[str] = None
    """Question template; None: the checkpoint's ``data.prompt_template``."""
    prompt_source: str = "argument"
    """How ``prompt_template`` was given (recorded in the report)."""
    limit: Optional[int] = None
    """At most this many examples per task (None: all)."""
    batch_size: int = 16
    max_new_tokens: int = 128
    chance: str = DEFAULT_PRESET
    """Chance-level preset of the stable score (megavlm.eval.stable_score.PRESETS)."""
    out_dir: Optional[str | Path] = None
    """Report folder (default ``<run_dir>/eval``)."""
    log_to_sinks: bool = True
    """Log the scores to the TensorBoard / W&B sinks the checkpoint's run config enables."""

    def __post_init__(self):
        if self.chance not in PRESETS:
            raise EvalError(f"unknown chance preset {self.chance!r}; known: {sorted(PRESETS)}")
        if self.paper_root is None and self.suite is None:
            raise EvalError("nothing to score vision with: give a suite (e.g. megavlm.demo.suites.OfflineSuite) "
                            "or paper_root")
        if self.paper_root is not None and not Path(self.paper_root).is_dir():
            raise EvalError(f"{self.paper_root}: no such benchmark data root (paper suite)")


@dataclass(frozen=True)
class Report:
    """The evaluation of one checkpoint: the report dict (megavlm.eval.report.build_report, also
    written as JSON + markdown: ``files``) with typed views of what tables and plots read."""

    data: dict
    files: tuple[Path, ...] = ()
    results: tuple[TaskResult, ...] = field(default=(), repr=False)
    """The vision tasks' results with their per-question rows."""

    @property
    def prompt(self) -> Prompt:
        return Prompt(self.data["prompt_template"], self.data["prompt_source"])

    def accuracies(self, kind: str) -> dict[str, float]:
        """``{task: accuracy}`` of ``kind`` ("text" or "vision"); tasks without an accuracy are left out."""
        return {t: r["accuracy"] for t, r in self.data[kind].items() if r.get("accuracy") is not None}

    @property
    def chance(self) -> dict[str, float]:
        return {t: r["chance"] for kind in ("text", "vision") for t, r in self.data[kind].items()
                if r.get("chance") is not None}

    @property
    def stable_score(self) -> dict[str, Optional[float]]:
        return dict(self.data["stable_score"])

    @property
    def metrics(self) -> dict[str, dict[str, float]]:
        """Each vision task's numbers other than accuracy and chance (perplexity, per-second rates …)."""
        return {t: {k: v for k, v in r.items() if k not in ("accuracy", "chance") and isinstance(v, (int, float))}
                for t, r in self.data["vision"].items()}


def eval_spec(source, *, suite: Optional[Suite] = None, data_root: Optional[str | Path] = None,
              vision_suite: Optional[str] = None, **fields) -> EvalSpec:
    """An EvalSpec from a preset name (``paper-table7`` …), a spec file / a recipe's ``eval:``
    section, or a mapping (megavlm.eval.tasks), with ``fields`` (EvalSpec fields) on top; a spec
    whose vision suite is not the paper's (or ``vision_suite="offline"``) scores vision with ``suite``."""
    kw = spec_fields(source, data_root=data_root, vision_suite=vision_suite)
    if "paper_root" not in kw and suite is None:
        raise EvalError("the evaluation spec names no paper vision suite (vision: {suite: paper, data_root: …}): "
                        "give an offline suite")
    return EvalSpec(**{"suite": suite, **kw, **fields})


def score_question_file(task: str, questions: Sequence[str | Path], embeds: str | Path, model: CheckpointModel,
                        *, template: str, name: str = "", limit: Optional[int] = None,
                        max_new_tokens: int = 128, annotations: Optional[str] = None,
                        shards: Optional[EvalShards] = None) -> TaskResult:
    """One vision task from question file(s) and the embedding store of their images."""
    qs = []
    for f in questions:
        if not Path(f).is_file():
            raise EvalError(f"{f}: no such question file (task {task})")
        if task == "vqav2":
            qs += vision.read_vqav2(f, annotations)
        elif task == "refcoco" and Path(f).suffix in (".p", ".pkl", ".pickle"):  # refs(…).p + instances.json
            qs += formats.read_questions(f, "refcoco", instances=annotations)
        else:
            qs += vision.READERS[task](f)
    qs = qs[:limit] if limit else qs
    bank = vision.ImageBank(store_prefix(embeds))  # data/own and data/own.embeds name one store
    rule = "refcoco" if task == "refer" else task
    return vision.score_task(rule, model, qs, bank, ",".join(map(str, questions)), max_new_tokens,
                             name=name or task, shards=shards, template=template)


def evaluate(checkpoint: Union[str, Path, CheckpointModel], spec: EvalSpec,
             skipped: Optional[list[str]] = None) -> Optional[Report]:
    """Score ``checkpoint`` (a checkpoint, stage or run folder, or an already loaded model) as
    ``spec`` says, write its report and return it. Under torchrun the vision questions are dealt out
    to the data-parallel ranks; rank 0 returns the report, the others None. Paper-suite tasks whose
    files are absent are appended to ``skipped`` (when given). Every task name and chance entry
    is checked before the model is loaded (megavlm.eval.tasks.check_spec)."""
    check_spec(spec)
    model = (checkpoint if isinstance(checkpoint, CheckpointModel)
             else CheckpointModel.load(checkpoint, batch_size=spec.batch_size))
    prompt = resolve_prompt(model, spec.prompt_template, spec.prompt_source)
    shards = EvalShards.from_parallel(model.parallel)
    if spec.paper_root is not None:
        vis, absent = paper.run_paper_suite(model, spec.paper_root, spec.paper_tasks, spec.limit,
                                            spec.max_new_tokens, spec.strict, shards, template=prompt.template)
        if skipped is not None:
            skipped += absent
    else:
        vis = spec.suite.vision(model, template=prompt.template, limit=spec.limit,
                                max_new_tokens=spec.max_new_tokens, shards=shards)
    for x in spec.extra_tasks:
        vis.append(score_question_file(x.task, [x.questions], x.embeds, model, template=prompt.template,
                                       name=x.name, limit=spec.limit, max_new_tokens=spec.max_new_tokens,
                                       shards=shards))
    if not shards.is_main:
        return None
    with tempfile.TemporaryDirectory(prefix="megavlm-eval-") as tmp:
        if spec.text_tasks or spec.suite is None:
            tasks = list(spec.text_tasks or TEXT_TASKS)
            res = run_text(model, tasks, spec.include_path, spec.limit, include_defaults=True)
            acc = text_accuracies(res, spec.text_metrics)
        else:
            _, acc = spec.suite.text(model, Path(tmp), spec.limit)
    data = reports.build_report(model.path, acc, vis, chance_preset=spec.chance,
                                extra={"prompt_template": prompt.template, "prompt_source": prompt.source})
    j, m = reports.write_report(data, spec.out_dir)
    data["files"] = [str(j), str(m)]
    if spec.log_to_sinks:
        log_eval_report(data)
    return Report(data, (j, m), tuple(vis))
