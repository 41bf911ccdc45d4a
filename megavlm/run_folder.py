"""The names of every file and folder a run writes or reads: the one owner of the run folder's layout.

Why one module: these names were spelled as literals in about ten modules (trainer, checkpoints,
preflight, evaluation, sinks, sweep, demo, plots, benchmarks), so a rename — or a reader that
guessed a name — went unnoticed until a run folder written by one was read by another. Every
module names them through here; nothing here reads or writes (no imports beyond the standard
library), so anything may import it.

A run folder (``run_dir``)::

    <run_dir>/
      config.yaml                          the resolved run config (CONFIG), by preflight
      data.json                            fingerprints of the data it trained on (RECORDED_DATA)
      metrics.jsonl                        one JSON record per logged step (METRICS), by the loop
      eval/<stage>-step_0000080.{json,md}  evaluation reports (EVAL_DIR, report_stem)
      eval/<stage>-step_0000080.answers.jsonl  every question's answer (REPORT_ANSWERS)
      <stage>/checkpoints/step_0000080/    a checkpoint (CHECKPOINTS, step_dir_name):
          meta.json                        written last: a folder without it is not a checkpoint
          config.yaml                      the run config it was saved under
          tokenizer/<file>                 the tokenizer (TOKENIZER_DIR)
          loader/dp<r>.json                each data-parallel rank's data position (loader_state_file)
      <stage>/latest, <run>/latest         the newest complete checkpoint, as a path suffix (LATEST)

A prepared data set ``<prefix>`` (megavlm.data): ``set_files``.
"""

from __future__ import annotations

from pathlib import Path

CONFIG = "config.yaml"
RECORDED_DATA = "data.json"
METRICS = "metrics.jsonl"
EVAL_DIR = "eval"
CHECKPOINTS = "checkpoints"
STEP_PREFIX = "step_"
META = "meta.json"
TOKENIZER_DIR = "tokenizer"
LOADER_DIR = "loader"
LATEST = "latest"
REPORT_ANSWERS = ".answers.jsonl"
"""Suffix, after a report's stem, of the file of every question's answer beside the report."""
EVAL_SUMMARY = "summary.json"
"""The demo's cache of a branch's scores, beside its reports in EVAL_DIR."""


def step_dir_name(step: int) -> str:
    """``step_0000080``: the folder of the checkpoint saved after ``step`` steps."""
    return f"{STEP_PREFIX}{int(step):07d}"


def loader_state_file(checkpoint: str | Path, dp_rank: int) -> Path:
    return Path(checkpoint) / LOADER_DIR / f"dp{int(dp_rank)}.json"


def report_stem(stage: str | None, step: int | None) -> str:
    """``<stage>-step_0000080``: the file name (without suffix) of a checkpoint's evaluation report."""
    return f"{stage or 'checkpoint'}-{step_dir_name(step or 0)}"


def run_dir_of(checkpoint: str | Path) -> Path:
    """``<run_dir>/<stage>/checkpoints/step_…`` -> ``<run_dir>`` (resolved; another folder: its parent)."""
    p = Path(checkpoint).resolve()
    return p.parents[2] if p.parent.name == CHECKPOINTS else p.parent


# -- prepared data sets -----------------------------------------------------------------------------

TOKENS = (".bin", ".idx")
"""Token dataset (megavlm.data.indexed): data and index."""
EMBEDS_META = ".embeds.json"
"""The metadata of an embedding store ``<prefix>.embeds`` (encoder, shape, record keys)."""
EMBEDS = (".embeds.bin", ".embeds.idx", EMBEDS_META)
"""Embedding store of a caption set."""
IMAGES = ".images.npy"
"""A conversation set's image record per conversation (-1: none)."""
CONVERSATION_META = ".meta.json"
"""A conversation set's metadata (the embedding store its images index)."""
CONVERSATION = (".mask.bin", ".mask.idx", IMAGES, CONVERSATION_META)
"""A conversation set's loss masks, image references and metadata (besides its tokens)."""


def set_files(kind: str, prefix: str | Path, embeds: bool = True) -> list[Path]:
    """The files of one prepared set of ``kind`` (tokenizer, text, captions, instructions) at
    ``prefix``. ``embeds=False`` lists of a caption set only what training checks (its tokens and
    the store's metadata)."""
    p = str(prefix)
    if kind == "tokenizer":
        return [Path(p)]
    if kind not in ("text", "captions", "instructions"):
        raise ValueError(f"unknown data set kind {kind!r} (tokenizer, text, captions, instructions)")
    out = [Path(p + s) for s in TOKENS]
    if kind == "captions":
        out += [Path(p + s) for s in (EMBEDS if embeds else EMBEDS[-1:])]
    if kind == "instructions":
        out += [Path(p + s) for s in CONVERSATION]
    return out
