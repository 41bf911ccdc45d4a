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
stable score with chance CHANCE (default 0). Own tasks are checked before the model loads and need
no demo corpus (without one, and without ``--demo-root``, only they run). The report's answers to
every question are written beside it (``….answers.jsonl``). ``--questions`` / ``--embeds``
without ``--task`` are an error (they would be ignored).

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
from typing import Optional

from megavlm.data.indexed import DataError
from megavlm.data.tokenizer import TokenizerError
from megavlm.eval.runner import EvalError


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
    from megavlm.eval.stable_score import DEFAULT_PRESET, PRESETS

    p.add_argument("--chance", default=DEFAULT_PRESET, choices=list(PRESETS),
                   help="chance levels of the stable score (megavlm.eval.stable_score.PRESETS); "
                        "named in the report")


def build_parser() -> argparse.ArgumentParser:
    from megavlm.eval import paper
    from megavlm.helpformat import HelpFormatter

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


def _load(args):
    from megavlm.eval.runner import CheckpointModel

    bs = str(args.batch_size)
    return CheckpointModel.load(args.checkpoint, batch_size=16 if bs.startswith("auto") else int(bs))


def _limit(args) -> Optional[int]:
    return None if args.limit is None else int(args.limit)


def _text(args, model, suite_dir: Path) -> tuple[dict, dict]:
    from megavlm.eval import suites
    from megavlm.eval.stable_score import TEXT_TASKS

    include = args.include_path
    if getattr(args, "offline", False) or (args.what == "all" and not args.tasks):
        include = suites.write_text_suite(suite_dir, suites.Sources.default(args.demo_root, args.wordnet))
        tasks = list(suites.TEXT_SUITE)
        defaults = False
    else:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else list(TEXT_TASKS)
        defaults = True
    res = suites.run_text(model, tasks, include, args.limit, include_defaults=defaults)
    return res, suites.text_accuracies(res)


def _vision(args, model, shards=None) -> list:
    from megavlm.eval import formats, paper, suites, vision

    if getattr(args, "suite", None) == "paper":
        if args.task:
            raise EvalError("--suite paper runs the suite's own tasks; drop --task")
        if not args.data_root:
            raise EvalError("--suite paper needs --data-root DIR (the layout is in --help)")
        tasks = [t.strip() for t in args.paper_tasks.split(",") if t.strip()] if args.paper_tasks else None
        results, absent = paper.run_paper_suite(model, args.data_root, tasks, _limit(args), args.max_new_tokens,
                                                args.strict, shards)
        if absent and (shards is None or shards.is_main):
            print(f"megavlm eval: skipped (not under {args.data_root}): {'; '.join(absent)}", file=sys.stderr)
        return results
    if not args.task:
        return suites.run_vision_suite(model, suites.Sources.default(args.demo_root, args.wordnet), _limit(args),
                                       args.max_new_tokens, shards=shards)
    if args.task not in vision.READERS:
        raise EvalError(f"unknown vision task {args.task!r}; known: {sorted(vision.READERS)}")
    if not args.questions or not args.embeds:
        raise EvalError(f"--task {args.task} needs --questions and --embeds")
    return [_one_task(args.task, args.questions, args.embeds, model, args, shards, args.task)]


def _one_task(task: str, questions: list, embeds: str, model, args, shards, name: str):
    from megavlm.data.indexed import store_prefix
    from megavlm.eval import formats, vision

    qs = []
    for f in questions:
        if not Path(f).is_file():
            raise EvalError(f"{f}: no such question file (task {task})")
        if task == "vqav2":
            qs += vision.read_vqav2(f, args.annotations)
        elif task == "refcoco" and Path(f).suffix in (".p", ".pkl", ".pickle"):  # refs(…).p + instances.json
            qs += formats.read_questions(f, "refcoco", instances=args.annotations)
        else:
            qs += vision.READERS[task](f)
    qs = qs[:_limit(args)] if args.limit else qs
    bank = vision.ImageBank(store_prefix(embeds))  # data/own and data/own.embeds name one store
    rule = "refcoco" if task == "refer" else task
    return vision.score_task(rule, model, qs, bank, ",".join(questions), args.max_new_tokens,
                             name=name, shards=shards)


def extra_tasks(specs: list[str]) -> list[tuple[str, str, str, str, float]]:
    """``TASK:QUESTIONS:EMBEDS[:CHANCE]`` -> (task, questions, embeds, report name, chance); the
    chance level is 0 unless given. Bad specs are errors."""
    from megavlm.eval import vision

    out = []
    for spec in specs:
        parts = spec.split(":")
        if len(parts) not in (3, 4) or not all(parts):
            raise EvalError(f"--extra-task {spec!r}: expected TASK:QUESTIONS:EMBEDS[:CHANCE], "
                            f"e.g. generic:q.jsonl:data/own or generic:q.jsonl:data/own:0.1")
        task, q, e = parts[:3]
        if task not in vision.READERS or task == "vqav2":
            raise EvalError(f"--extra-task {spec!r}: unknown task {task!r}; known: "
                            f"{sorted(t for t in vision.READERS if t != 'vqav2')}")
        try:
            level = float(parts[3]) if len(parts) == 4 else 0.0
        except ValueError:
            level = -1.0
        if not 0.0 <= level < 1.0:
            raise EvalError(f"--extra-task {spec!r}: CHANCE must be a number in [0, 1), got {parts[3]!r}")
        out.append((task, q, e, f"{task}:{Path(q).stem}", level))
    return out


def check_task_files(task: str, questions: list, embeds: str, what: str) -> None:
    """Before any model loads: the question files parse with the task's reader and the embedding
    store exists (a missing store is named as such, with the command that makes it)."""
    from megavlm.data.indexed import store_prefix
    from megavlm.eval import vision

    for f in questions:
        if not Path(f).is_file():
            raise EvalError(f"{f}: no such question file ({what})")
        if task not in ("vqav2", "refcoco"):
            if not vision.READERS[task](f):
                raise EvalError(f"{f}: no questions ({what})")
    store = store_prefix(embeds)
    if not Path(f"{store}.json").is_file() and not Path(f"{store}.idx").is_file():
        raise EvalError(f"{embeds}: no embedding store there ({what}); encode the task's images with "
                        f"tools/encode_images.py --input IMAGES --output {embeds} --no-captions")


def _offline_missing(args) -> Optional[str]:
    """Why the demo-asset suites cannot run (None when they can)."""
    from megavlm.eval import suites

    src = suites.Sources.default(args.demo_root, args.wordnet)
    for rel in ("raw/text_heldout.jsonl", "captions_heldout.embeds", "raw/captions_heldout.jsonl"):
        try:
            src.need(rel)
        except EvalError as e:
            return str(e)
    return None


def run(args) -> Optional[dict]:
    """The command's summary on rank 0; None on the other data-parallel ranks."""
    from megavlm.eval import report
    from megavlm.eval.distributed import EvalShards

    extras = extra_tasks(args.extra_task) if args.what == "all" else []  # bad specs fail before loading
    for task, q, e, name, _ in extras:
        check_task_files(task, [q], e, f"--extra-task {name}")
    if args.what == "vision" and not args.task and (args.questions or args.embeds):
        raise EvalError("--questions/--embeds need --task (generic for own question files); "
                        "without --task the offline suite runs and they would be ignored")
    if args.what == "vision" and args.task in ("generic",) and args.questions and args.embeds:
        check_task_files(args.task, args.questions, args.embeds, f"--task {args.task}")
    skip_offline = None
    if args.what == "all" and extras and not args.demo_root and getattr(args, "suite", None) != "paper":
        skip_offline = _offline_missing(args)  # own tasks need no demo corpus: run them alone
    model = _load(args)
    if args.prompt is not None:
        if "{question}" not in args.prompt:
            raise EvalError(f"--prompt {args.prompt!r} must contain {{question}}")
        model.prompt_template, model.prompt_source = args.prompt.replace("\\n", "\n"), "--prompt"
    shards = EvalShards.from_parallel(model.parallel)
    if args.what == "text" and not shards.is_main:
        return None  # lm-eval runs on rank 0 only
    with tempfile.TemporaryDirectory(prefix="megavlm-eval-") as tmp:
        if args.what == "text":
            res, acc = _text(args, model, Path(tmp))
            out = {"checkpoint": str(Path(model.path).resolve()), "results": res["results"], "accuracy": acc}
            if args.output_path:
                Path(args.output_path).parent.mkdir(parents=True, exist_ok=True)
                Path(args.output_path).write_text(json.dumps(res, indent=1, default=str))
            return out
        if args.what == "vision":
            results = _vision(args, model, shards)
            if not shards.is_main:
                return None
            out = {r.task: {"accuracy": r.accuracy, "n": r.n, **r.metrics} for r in results}
            out["prompt"] = {"template": model.prompt_template, "source": model.prompt_source}
            out["checkpoint"] = str(Path(model.path).resolve())
            if args.output_path:
                _write_atomic(Path(args.output_path), json.dumps(
                    {**{r.task: {**out[r.task], "predictions": r.predictions} for r in results},
                     "prompt": out["prompt"], "checkpoint": out["checkpoint"]}, indent=1))
            return out
        args.task, args.max_new_tokens = None, 128
        if skip_offline is None:
            vis = _vision(args, model, shards)
        else:
            vis = []
            if shards.is_main:
                print(f"megavlm eval: offline suites skipped, only the --extra-task tasks run ({skip_offline}; "
                      f"give --demo-root to include them)", file=sys.stderr)
        own = [(_one_task(task, [q], e, model, args, shards, name), level) for task, q, e, name, level in extras]
        if not shards.is_main:
            return None
        acc = {} if skip_offline is not None and not args.tasks else _text(args, model, Path(tmp))[1]
        rep = report.build_report(model.path, acc, vis, chance_preset=args.chance, own=own,
                                  extra={"prompt_template": model.prompt_template,
                                         "prompt_source": model.prompt_source,
                                         **({"skipped": skip_offline} if skip_offline else {})})
        j, m = report.write_report(rep, args.out_dir)
        answers = j.with_suffix(".answers.jsonl")  # every question's answer, beside the report
        _write_atomic(answers, "".join(json.dumps({"task": r.task, **row}) + "\n"
                                       for r in [*vis, *(t for t, _ in own)] for row in r.predictions))
        rep["files"] = [str(j), str(m), str(answers)]
        from megavlm.sinks import log_eval_report

        log_eval_report(rep)  # to the TensorBoard / W&B sinks the checkpoint's run config enables
        return rep


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _quiet_git() -> None:
    """lm-eval records the git commit of the working directory by running ``git describe`` with
    its stderr on the terminal, so outside a checkout every text evaluation printed ``fatal: not a
    git repository``; ask git the same with its stderr discarded."""
    import subprocess

    try:
        import lm_eval.evaluator as ev
    except Exception:  # lm-eval absent or broken: the text tasks report that themselves
        return

    def quiet_commit() -> Optional[str]:
        try:
            return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL).strip().decode()
        except (subprocess.CalledProcessError, OSError):
            return None

    ev.get_git_commit_hash = quiet_commit


def main(argv: Optional[list[str]] = None) -> int:
    """Entry of ``megavlm eval``: parse, run, print a JSON summary; 2 on bad input."""
    from megavlm.checkpoint_format import CheckpointError

    import warnings

    # megatron-core and torch's checkpoint loader announce fallbacks and deprecations on every load
    for module in ("megatron", "torch.distributed.checkpoint"):
        warnings.filterwarnings("ignore", category=UserWarning, module=module)
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.what in ("text", "all"):
        _quiet_git()
    try:
        out = run(args)
    except (EvalError, CheckpointError, DataError, TokenizerError) as e:
        print(f"megavlm eval: error: {e}", file=sys.stderr)
        return 2
    if out is not None:
        print(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
