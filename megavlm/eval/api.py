"""Evaluation as a library: ``evaluate(checkpoint, EvalSpec(...)) -> Report``.

The one entry that scores a checkpoint and writes its report: ``megavlm eval all`` (megavlm.eval.cli
builds a spec from its flags), the sweep and the demo (megavlm.experiment.scoring) call it with
typed arguments, never an argv. What is asked is all in the spec:

* text: lm-eval tasks by name (``text_tasks``, with an ``include_path`` of local YAML tasks), or the
  text half of a :class:`Suite`;
* vision: the paper's suite from the benchmarks' published files (``paper_root``), or the vision
  half of a :class:`Suite`;
* own question files (``extra_tasks``, :class:`ExtraTask`): reported in a section of their own
  (``own``), each with the chance level it was given (0 unless given), outside the stable scores,
  which stay comparable with the paper's. Their files are checked before any model loads
  (:func:`check_task_files`), and they need no demo corpus: with ``suite_optional`` a suite whose
  assets are absent (its ``missing()``) is skipped and only they run (plus ``text_tasks`` if named);
* the question template (``prompt_template``): given explicitly, or ``None`` for the one the
  checkpoint recorded at training (``data.prompt_template``, megavlm.eval.runner.recorded_prompt).
  It is resolved once (:func:`resolve_prompt`) and passed down to every task as an argument; the
  model object never carries it. The report names the template and where it came from.

A :class:`Suite` is an object with ``text(model, workdir, limit)`` and ``vision(model, template=…, …)``:
the offline suites built from the demo's assets are one (megavlm.demo.suites.OfflineSuite). The
caller hands it in, so this package never imports the demo. A suite may also offer ``missing() ->
Optional[str]`` (why its assets are absent, None when they are there).

The report (megavlm.eval.report) names the checkpoint by its absolute path; every question's answer
is written beside it (``<stem>.answers.jsonl``, one JSON object a line with its ``task``).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol, Sequence, Union

from megavlm.data.indexed import store_prefix
from megavlm.eval import formats, paper, report as reports, vision
from megavlm.eval.distributed import EvalShards
from megavlm.eval.runner import CheckpointModel, EvalError, recorded_prompt
from megavlm.eval.stable_score import DEFAULT_PRESET, PRESETS, TEXT_TASKS
from megavlm.eval.text import run_text, text_accuracies
from megavlm.eval.vision import TaskResult
from megavlm.run_folder import REPORT_ANSWERS
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
    """An own question file scored as one more task: ``task`` names its reader and rule (a key of
    megavlm.eval.formats.READERS except vqav2), ``embeds`` the store of its images, ``chance`` its
    chance level (0 unless given: an own task has no preset). Reported in the ``own`` section,
    apart from the stable scores."""

    task: str
    questions: str
    embeds: str
    name: str = ""
    chance: float = 0.0

    def __post_init__(self):
        if self.task not in vision.READERS or self.task == "vqav2":
            raise EvalError(f"extra task {self.task}:{self.questions}: unknown task {self.task!r}; known: "
                            f"{sorted(t for t in vision.READERS if t != 'vqav2')}")
        if not isinstance(self.chance, (int, float)) or not 0.0 <= self.chance < 1.0:
            raise EvalError(f"extra task {self.task}:{self.questions}: chance must be a number in [0, 1), "
                            f"got {self.chance!r}")
        if not self.name:
            object.__setattr__(self, "name", f"{self.task}:{Path(self.questions).stem}")


def check_task_files(task: str, questions: Sequence[str | Path], embeds: str | Path, what: str) -> None:
    """Before any model loads: the question files exist and parse with the task's reader, and the
    embedding store exists (a missing store is named as such, with the command that makes it)."""
    for f in questions:
        if not Path(f).is_file():
            raise EvalError(f"{f}: no such question file ({what})")
        if task not in ("vqav2", "refcoco") and not vision.READERS[task](f):
            raise EvalError(f"{f}: no questions ({what})")
    store = store_prefix(embeds)
    if not Path(f"{store}.json").is_file() and not Path(f"{store}.idx").is_file():
        raise EvalError(f"{embeds}: no embedding store there ({what}); encode the task's images with "
                        f"tools/encode_images.py --input IMAGES --output {embeds} --no-captions")


def suite_missing(suite: Suite) -> Optional[str]:
    """Why ``suite``'s assets are absent (its ``missing()``); None when present or it cannot say."""
    missing = getattr(suite, "missing", None)
    return missing() if callable(missing) else None


@dataclass(frozen=True)
class EvalSpec:
    """What :func:`evaluate` runs on a checkpoint (see the module docstring)."""

    suite: Optional[Suite] = None
    """Text and vision suite used where ``text_tasks`` / ``paper_root`` do not say otherwise."""
    text_tasks: Optional[Sequence[str]] = None
    """lm-eval task names instead of the suite's text (without a suite: the paper's nine)."""
    include_path: Optional[str | Path] = None
    """Folder of local lm-eval YAML tasks that ``text_tasks`` may name."""
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
    suite_optional: bool = False
    """With ``extra_tasks``: a suite whose assets are absent (its ``missing()``) is skipped, with a
    notice, instead of failing (own tasks need no demo corpus); ``megavlm eval all`` sets it when
    no ``--demo-root`` is given."""
    out_dir: Optional[str | Path] = None
    """Report folder (default ``<run_dir>/eval``)."""
    log_to_sinks: bool = True
    """Log the scores to the TensorBoard / W&B sinks the checkpoint's run config enables."""

    def __post_init__(self):
        if self.chance not in PRESETS:
            raise EvalError(f"unknown chance preset {self.chance!r}; known: {sorted(PRESETS)}")
        if self.paper_root is None and self.suite is None and not self.extra_tasks:
            raise EvalError("nothing to score vision with: give a suite (e.g. megavlm.demo.suites.OfflineSuite), "
                            "paper_root or extra_tasks")
        if self.paper_root is not None and not Path(self.paper_root).is_dir():
            raise EvalError(f"{self.paper_root}: no such benchmark data root (paper suite)")


@dataclass(frozen=True)
class Report:
    """The evaluation of one checkpoint: the report dict (megavlm.eval.report.build_report, also
    written as JSON + markdown: ``files``) with typed views of what tables and plots read."""

    data: dict
    files: tuple[Path, ...] = ()
    results: tuple[TaskResult, ...] = field(default=(), repr=False)
    """The vision and own tasks' results with their per-question rows."""

    @property
    def prompt(self) -> Prompt:
        return Prompt(self.data["prompt_template"], self.data["prompt_source"])

    def accuracies(self, kind: str) -> dict[str, float]:
        """``{task: accuracy}`` of ``kind`` ("text", "vision" or "own"); tasks without an accuracy are left out."""
        return {t: r["accuracy"] for t, r in self.data.get(kind, {}).items() if r.get("accuracy") is not None}

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
    files are absent are appended to ``skipped`` (when given). Own tasks' files are checked, and an
    absent optional suite is found, before the model loads."""
    for x in spec.extra_tasks:
        check_task_files(x.task, [x.questions], x.embeds, f"extra task {x.name}")
    suite, suite_absent = spec.suite, None
    if spec.suite_optional and spec.extra_tasks and spec.paper_root is None and suite is not None:
        suite_absent = suite_missing(suite)
        if suite_absent is not None:
            suite = None  # own tasks need no demo corpus: they run alone
    model = (checkpoint if isinstance(checkpoint, CheckpointModel)
             else CheckpointModel.load(checkpoint, batch_size=spec.batch_size))
    prompt = resolve_prompt(model, spec.prompt_template, spec.prompt_source)
    shards = EvalShards.from_parallel(model.parallel)
    if spec.paper_root is not None:
        vis, absent = paper.run_paper_suite(model, spec.paper_root, spec.paper_tasks, spec.limit,
                                            spec.max_new_tokens, spec.strict, shards, template=prompt.template)
        if skipped is not None:
            skipped += absent
    elif suite is not None:
        vis = suite.vision(model, template=prompt.template, limit=spec.limit,
                           max_new_tokens=spec.max_new_tokens, shards=shards)
    else:
        vis = []
        if shards.is_main and suite_absent is not None:
            print(f"megavlm eval: offline suites skipped, only the extra (own) tasks run ({suite_absent}; "
                  f"give the demo corpus root, --demo-root, to include them)", file=sys.stderr)
    own = [(score_question_file(x.task, [x.questions], x.embeds, model, template=prompt.template,
                                name=x.name, limit=spec.limit, max_new_tokens=spec.max_new_tokens,
                                shards=shards), x.chance) for x in spec.extra_tasks]
    if not shards.is_main:
        return None
    with tempfile.TemporaryDirectory(prefix="megavlm-eval-") as tmp:
        if spec.text_tasks or (suite is None and spec.paper_root is not None):
            tasks = list(spec.text_tasks or TEXT_TASKS)
            res = run_text(model, tasks, spec.include_path, spec.limit, include_defaults=True)
            acc = text_accuracies(res)
        elif suite is not None:
            _, acc = suite.text(model, Path(tmp), spec.limit)
        else:
            acc = {}  # own tasks alone
    data = reports.build_report(model.path, acc, vis, chance_preset=spec.chance, own=own,
                                extra={"prompt_template": prompt.template, "prompt_source": prompt.source,
                                       **({"skipped": suite_absent} if suite_absent is not None else {})})
    j, m = reports.write_report(data, spec.out_dir)
    results = (*vis, *(r for r, _ in own))
    answers = j.with_name(j.stem + REPORT_ANSWERS)  # every question's answer, beside the report
    write_atomic(answers, "".join(json.dumps({"task": r.task, **row}, default=str) + "\n"
                                  for r in results for row in r.predictions))
    data["files"] = [str(j), str(m), str(answers)]
    if spec.log_to_sinks:
        log_eval_report(data)
    return Report(data, (j, m, answers), results)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it (a reader never sees half)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
