"""``megavlm eval {text,vision,all}``: score a checkpoint with one command.

    megavlm eval text   --checkpoint C [--tasks a,b | --offline] [--limit N] [--batch-size B]
                        [--include-path DIR] [--output-path FILE]
    megavlm eval vision --checkpoint C [--task vqav2 --questions Q [--annotations A] --embeds PREFIX]
                        [--limit N] [--batch-size B] [--output-path FILE]
    megavlm eval vision --checkpoint C --suite paper --data-root DIR [--paper-tasks a,b] [--strict]
    megavlm eval all    --checkpoint C [--tasks ...] [--limit N] [--out-dir DIR]

``text`` runs lm-eval tasks (default: the paper's nine; ``--offline``: the local suite built from
the demo assets). ``vision`` runs the offline vision suite, or one benchmark task from its
question file and an embedding store of its images. ``all`` runs text + vision (offline suites
unless ``--tasks`` names lm-eval tasks) and writes the JSON + markdown report into the run
directory. Bad input ends with one line ``megavlm eval: error: …`` and exit status 2.

``all`` is a thin layer over the library entry ``megavlm.eval.api.evaluate`` (``spec_of`` turns the
flags into its EvalSpec); the offline suites are the demo's (megavlm.demo.suites.OfflineSuite),
handed to ``main`` by ``megavlm eval`` (megavlm.cli) so that this package never imports the demo.

Checkpoints: ``--checkpoint`` takes a checkpoint (``<run>/<stage>/checkpoints/step_…``), a stage
folder (``runs/x/sft``) or a run folder (``runs/x``: its last stage), each optionally ending in
``/latest``: the newest complete checkpoint. A folder that is none of these is "not a checkpoint".

Prompt: vision questions are asked as the checkpoint's ``data.prompt_template`` (recorded at
training; default ``"\\n{question}\\nAnswer the question using a single word or phrase."``, LLaVA-1.5's
short-answer prompt). It must phrase questions as the instruction data did; ``--prompt T``
overrides it. Results and reports name the template and where it came from.

Own questions: ``eval vision --task generic --questions Q.jsonl --embeds PREFIX`` (one JSON object a
line: ``{"question_id", "image", "question", "answers": [...]}``; ``image`` is a key of the store
made by tools/encode_images.py, PREFIX its ``--output``), and ``eval all --extra-task
generic:Q.jsonl:PREFIX[:CHANCE]`` (repeatable) adds such a task to the report, listed apart from the
stable score (section ``own``) with chance CHANCE (default 0). Own tasks are checked before the model
loads and need no demo corpus (without one, and without ``--demo-root``, only they run). The
report's answers to every question are written beside it (``….answers.jsonl``), and every result
names the checkpoint by its absolute path. ``--questions`` / ``--embeds`` without ``--task`` are an
error (they would be ignored).

``--suite paper`` runs the paper's vision suite from the benchmarks' published files under
``--data-root DIR`` (layout below); tasks whose files are absent are listed and skipped unless
``--strict``. Images are encoded once with the checkpoint's recorded encoder into
``DIR/.megavlm-cache/<encoder>-<size>px/``.

Data parallel: ``torchrun --nproc_per_node=N -m megavlm eval vision …`` deals each vision task's
questions out to the N ranks (strided), gathers the per-question rows and scores them on every
rank; rank 0 alone prints and writes. Text tasks (lm-eval) run on rank 0 only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
import warnings
from typing import Callable, Optional

from megavlm.checkpoint_format import CheckpointError
from megavlm.data.indexed import DataError
from megavlm.data.tokenizer import TokenizerError
from megavlm.eval import paper, vision
from megavlm.eval.api import (EvalSpec, ExtraTask, Suite, check_task_files, evaluate, resolve_prompt,
                               score_question_file, write_atomic)
from megavlm.eval.distributed import EvalShards
from megavlm.eval.runner import CheckpointModel, EvalError
from megavlm.eval.stable_score import DEFAULT_PRESET, PRESETS, TEXT_TASKS
from megavlm.eval.text import run_text, text_accuracies
from megavlm.helpformat import HelpFormatter


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint <run>/<stage>/checkpoints/step_…, or a stage / run folder "
                        "(optionally …/latest): its newest complete checkpoint")
    p.add_argument("--prompt", default=None,
                   help="question template with {question} (default: the checkpoint's data.prompt_template, "
                        "itself defaulting to '\\n{question}\\nAnswer the question using a single word or phrase.')")
    p.add_argument("--limit", type=float, default=None, help="at most this many examples per task")
    p.add_argument("--batch-size", default="16", help="requests per forward pass")
    p.add_argument("--demo-root", default=None, help="demo corpus root (offline suites)")
    p.add_argument("--wordnet", default=None, help="WordNet data folder (default: the demo build's)")
    p.add_argument("--chance", default=DEFAULT_PRESET, choices=list(PRESETS),
                   help="chance levels of the stable score (megavlm.eval.stable_score.PRESETS); "
                        "named in the report")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="megavlm eval", description=__doc__, epilog=paper.__doc__,
                                 formatter_class=HelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    t = sub.add_parser("text", help="lm-eval tasks", formatter_class=HelpFormatter)
    _common(t)
    t.add_argument("--tasks", default=None, help="comma-separated lm-eval task names")
    t.add_argument("--offline", action="store_true", help="the offline local suite")
    t.add_argument("--include-path", default=None, help="folder of local lm-eval YAML tasks")
    t.add_argument("--output-path", default=None, help="write lm-eval's results JSON here")
    v = sub.add_parser("vision", help="vision tasks on stored image embeddings", epilog=paper.__doc__,
                       formatter_class=HelpFormatter)
    _common(v)
    v.add_argument("--task", default=None, help="vqav2 | gqa | textvqa | pope | refcoco | ocid_ref | refer | generic")
    v.add_argument("--questions", action="append", default=None, help="question file (repeat for POPE splits)")
    v.add_argument("--annotations", default=None,
                   help="VQAv2 annotation file; RefCOCO instances.json (default: beside refs(…).p)")
    v.add_argument("--embeds", default=None, help="embedding store prefix of the task's images")
    v.add_argument("--max-new-tokens", type=int, default=128)
    v.add_argument("--suite", choices=("offline", "paper"), default=None,
                   help="offline: the demo-asset suite (the default without --task); paper: the paper's "
                        "benchmarks from their published files under --data-root")
    v.add_argument("--data-root", default=None, help="root of the downloaded benchmarks (--suite paper)")
    v.add_argument("--paper-tasks", default=None, help="comma-separated subset of the paper suite's tasks")
    v.add_argument("--strict", action="store_true", help="--suite paper: a missing task is an error")
    v.add_argument("--output-path", default=None, help="write the results JSON here")
    a = sub.add_parser("all", help="text + vision, report into the run directory", formatter_class=HelpFormatter)
    _common(a)
    a.add_argument("--tasks", default=None, help="lm-eval tasks instead of the offline text suite")
    a.add_argument("--extra-task", action="append", default=[], metavar="TASK:QUESTIONS:EMBEDS[:CHANCE]",
                   help="an own vision task joining the report, e.g. generic:q.jsonl:data/own or "
                        "generic:q.jsonl:data/own:0.1 (repeatable; TASK is a reader of eval vision --task, the "
                        "report names it TASK:QUESTIONS' stem; CHANCE, default 0, is its chance level; own tasks "
                        "are listed apart from the stable score; without --demo-root and no demo corpus, only "
                        "they run)")
    a.add_argument("--include-path", default=None)
    a.add_argument("--out-dir", default=None, help="report folder (default <run_dir>/eval)")
    a.add_argument("--suite", choices=("offline", "paper"), default=None,
                   help="vision suite: offline (default) or paper (with --data-root)")
    a.add_argument("--data-root", default=None, help="root of the downloaded benchmarks (--suite paper)")
    a.add_argument("--paper-tasks", default=None, help="comma-separated subset of the paper suite's tasks")
    a.add_argument("--strict", action="store_true", help="--suite paper: a missing task is an error")
    return ap


OfflineFactory = Callable[[Optional[str], Optional[str]], Suite]
"""(demo_root, wordnet) -> the offline suite (megavlm.demo.suites.OfflineSuite.default, handed in by
``megavlm eval``: the suites are the demo's, and this package does not import the demo)."""


def _limit(args) -> Optional[int]:
    return None if args.limit is None else int(args.limit)


def _batch_size(args) -> int:
    bs = str(args.batch_size)
    return 16 if bs.startswith("auto") else int(bs)


def _offline(args, offline: Optional[OfflineFactory]) -> Suite:
    if offline is None:
        raise EvalError("the offline suites are the demo's: run them through `megavlm eval` "
                        "(or pass megavlm.demo.suites.OfflineSuite.default to megavlm.eval.cli.main)")
    return offline(args.demo_root, args.wordnet)


def _prompt_arg(args) -> Optional[str]:
    if args.prompt is None:
        return None
    if "{question}" not in args.prompt:
        raise EvalError(f"--prompt {args.prompt!r} must contain {{question}}")
    return args.prompt.replace("\\n", "\n")


def _text(args, model, suite_dir: Path, offline: Optional[OfflineFactory]) -> dict:
    if args.offline:
        res, _ = _offline(args, offline).text(model, suite_dir, args.limit)
        return res
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else list(TEXT_TASKS)
    return run_text(model, tasks, args.include_path, args.limit, include_defaults=True)


def _vision(args, model, shards, template: str, offline: Optional[OfflineFactory]) -> list:
    if args.suite == "paper":
        if args.task:
            raise EvalError("--suite paper runs the suite's own tasks; drop --task")
        if not args.data_root:
            raise EvalError("--suite paper needs --data-root DIR (the layout is in --help)")
        tasks = [t.strip() for t in args.paper_tasks.split(",") if t.strip()] if args.paper_tasks else None
        results, absent = paper.run_paper_suite(model, args.data_root, tasks, _limit(args), args.max_new_tokens,
                                                args.strict, shards, template=template)
        if absent and shards.is_main:
            print(f"megavlm eval: skipped (not under {args.data_root}): {'; '.join(absent)}", file=sys.stderr)
        return results
    if not args.task:
        return _offline(args, offline).vision(model, template=template, limit=_limit(args),
                                              max_new_tokens=args.max_new_tokens, shards=shards)
    if args.task not in vision.READERS:
        raise EvalError(f"unknown vision task {args.task!r}; known: {sorted(vision.READERS)}")
    if not args.questions or not args.embeds:
        raise EvalError(f"--task {args.task} needs --questions and --embeds")
    return [score_question_file(args.task, args.questions, args.embeds, model, template=template, name=args.task,
                                limit=_limit(args), max_new_tokens=args.max_new_tokens,
                                annotations=args.annotations, shards=shards)]


def extra_tasks(specs: list[str]) -> list[ExtraTask]:
    """``TASK:QUESTIONS:EMBEDS[:CHANCE]`` -> ExtraTask (report name ``TASK:<QUESTIONS' stem>``, chance
    CHANCE, 0 unless given); bad specs are errors."""
    out = []
    for spec in specs:
        parts = spec.split(":")
        if len(parts) not in (3, 4) or not all(parts):
            raise EvalError(f"--extra-task {spec!r}: expected TASK:QUESTIONS:EMBEDS[:CHANCE], "
                            f"e.g. generic:q.jsonl:data/own or generic:q.jsonl:data/own:0.1")
        try:
            level = float(parts[3]) if len(parts) == 4 else 0.0
        except ValueError:
            level = -1.0
        if not 0.0 <= level < 1.0:
            raise EvalError(f"--extra-task {spec!r}: CHANCE must be a number in [0, 1), got {parts[3]!r}")
        try:
            out.append(ExtraTask(*parts[:3], chance=level))
        except EvalError as e:
            raise EvalError(f"--extra-task {spec!r}: {e}") from None
    return out


def spec_of(args, offline: Optional[OfflineFactory] = None) -> EvalSpec:
    """The EvalSpec of ``megavlm eval all``'s flags. Own tasks' files are checked here, before
    anything loads; without ``--demo-root`` the offline suite is optional to them (no demo corpus,
    or no offline suite handed in: only they run)."""
    extras = extra_tasks(args.extra_task)  # a bad spec is named before anything else is looked at
    for x in extras:
        check_task_files(x.task, [x.questions], x.embeds, f"--extra-task {x.name}")
    paper_root = None
    if args.suite == "paper":
        if not args.data_root:
            raise EvalError("--suite paper needs --data-root DIR (the layout is in --help)")
        paper_root = args.data_root
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    optional = bool(extras) and not args.demo_root and paper_root is None
    if optional and offline is None:
        suite = None  # the own tasks alone (no offline suite to run)
    else:
        suite = _offline(args, offline) if paper_root is None or not tasks else None
    return EvalSpec(suite=suite, text_tasks=tasks, include_path=args.include_path, paper_root=paper_root,
                    paper_tasks=[t.strip() for t in args.paper_tasks.split(",") if t.strip()] if args.paper_tasks else None,
                    strict=args.strict, extra_tasks=extras, suite_optional=optional,
                    prompt_template=_prompt_arg(args), prompt_source="--prompt", limit=_limit(args),
                    batch_size=_batch_size(args), chance=args.chance, out_dir=args.out_dir)


def run(args, offline: Optional[OfflineFactory] = None) -> Optional[dict]:
    """The command's summary on rank 0; None on the other data-parallel ranks."""
    if args.what == "all":
        skipped: list[str] = []
        rep = evaluate(args.checkpoint, spec_of(args, offline), skipped)  # bad specs fail before loading
        if skipped:
            print(f"megavlm eval: skipped (not under {args.data_root}): {'; '.join(skipped)}", file=sys.stderr)
        return None if rep is None else rep.data
    if args.what == "vision" and not args.task and (args.questions or args.embeds):
        raise EvalError("--questions/--embeds need --task (generic for own question files); "
                        "without --task the offline suite runs and they would be ignored")
    if args.what == "vision" and args.task == "generic" and args.questions and args.embeds:
        check_task_files(args.task, args.questions, args.embeds, f"--task {args.task}")  # before loading
    template = _prompt_arg(args)
    model = CheckpointModel.load(args.checkpoint, batch_size=_batch_size(args))
    prompt = resolve_prompt(model, template, "--prompt")
    shards = EvalShards.from_parallel(model.parallel)
    if args.what == "text":
        if not shards.is_main:
            return None  # lm-eval runs on rank 0 only
        with tempfile.TemporaryDirectory(prefix="megavlm-eval-") as tmp:
            res = _text(args, model, Path(tmp), offline)
        out = {"checkpoint": str(Path(model.path).resolve()), "results": res["results"],
               "accuracy": text_accuracies(res)}
        if args.output_path:
            write_atomic(Path(args.output_path), json.dumps(res, indent=1, default=str))
        return out
    results = _vision(args, model, shards, prompt.template, offline)
    if not shards.is_main:
        return None
    out = {r.task: {"accuracy": r.accuracy, "n": r.n, **r.metrics} for r in results}
    out["prompt"] = {"template": prompt.template, "source": prompt.source}
    out["checkpoint"] = str(Path(model.path).resolve())
    if args.output_path:
        write_atomic(Path(args.output_path), json.dumps(
            {**{r.task: {**out[r.task], "predictions": r.predictions} for r in results},
             "prompt": out["prompt"], "checkpoint": out["checkpoint"]}, indent=1))
    return out


def main(argv: Optional[list[str]] = None, offline: Optional[OfflineFactory] = None) -> int:
    """Entry of ``megavlm eval``: parse, run, print a JSON summary; 2 on bad input. ``offline``
    makes the offline suites (``megavlm eval`` passes megavlm.demo.suites.OfflineSuite.default)."""
    # megatron-core and torch's checkpoint loader announce fallbacks and deprecations on every load
    for module in ("megatron", "torch.distributed.checkpoint"):
        warnings.filterwarnings("ignore", category=UserWarning, module=module)
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        out = run(args, offline)
    except (EvalError, CheckpointError, DataError, TokenizerError) as e:
        print(f"megavlm eval: error: {e}", file=sys.stderr)
        return 2
    if out is not None:
        print(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
