"""Evaluation benchmarks: generation with and without the KV cache, and the offline suites' throughput.

    python -m megavlm.bench.eval [--checkpoint C] [--new-tokens 32,128] [--batch-sizes 1,16]
                                 [--repeats 3] [--out benchmarks/]           # = megavlm bench eval
    python -m megavlm.bench.eval --suites --checkpoint C [--demo-root R] [--batch-size 16]

**Generation** (the default) times ``CheckpointModel.generate`` — greedy decoding, image rows
(``[P placeholders][SEP]`` + a question of 8-24 tokens, random image embeddings) — at every
(new tokens, batch size) pair, with the KV cache (``cache=True``: the prompts once, then one
token per row) and without it (``cache=False``: each new token re-runs the prefix), alternating
which goes first in each repeat so drifting machine load hits both alike. It reports medians, the
ratio, and whether both produced the same tokens (they must). With ``--checkpoint`` the model is
that checkpoint (rows stop at its sequence length); without one it is the demo recipe's model
section (launch/configs/demo.yaml) at random initialisation, with the sequence length raised so
the longest run fits (rotary positions have no table, so only the cache size depends on it), and a
small sentencepiece tokenizer trained on the spot for the special ids. Writes
``<out>/<date>-cpu-eval-generation.md``.

**Suites** (``--suites``) loads a checkpoint and times, in the same process: the offline text
suite through lm-eval (questions = documents; each is 4 batched log-likelihood requests), the same
WordNet task at batch size 1 vs the chosen batch size (the batching ratio), and each offline vision
task. Writes ``<out>/<date>-cpu-eval.md``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

SIZES = {
    "demo": None,  # launch/configs/demo.yaml's model section
    "tiny": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "ffn_hidden_size": 96,
             "vocab_size": 512, "vision": {"embed_dim": 24, "num_patches": 4}},
}
"""Random-initialised model sizes (without --checkpoint); tiny is for the command's own test."""


@dataclass(frozen=True)
class GenRow:
    new_tokens: int
    batch: int
    generated: int
    """Tokens produced by one cached run (rows may stop early at EOD or the sequence length)."""
    cached: list[float]
    uncached: list[float]
    same: bool
    """Whether every cached run produced exactly the uncached runs' tokens."""

    @property
    def speedup(self) -> float:
        return statistics.median(self.uncached) / statistics.median(self.cached)


def _words(n: int, seed: int) -> str:
    import numpy as np

    words = ("the a cat dog bird fish red blue green small large runs jumps sleeps eats near under "
             "over house tree river stone light dark one two three what is shown in image yes no").split()
    rng = np.random.default_rng(seed)
    return "\n".join(" ".join(words[int(i)] for i in rng.integers(0, len(words), int(rng.integers(4, 20))))
                     for _ in range(n))


def random_model(size: str, seq_length: int, workdir: Path):
    """A CheckpointModel of a random-initialised model of ``size`` (one process, fp32) with a small
    sentencepiece tokenizer trained in ``workdir``."""
    import torch
    import yaml

    from megavlm.config import ParallelConfig, load_config
    from megavlm.data.tokenizer import train_sentencepiece
    from megavlm.experiment.demo import DEFAULT_CONFIG
    from megavlm.eval.runner import CheckpointModel
    from megavlm.model.build import build_model
    from megavlm.parallel.state import Parallel

    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    if SIZES[size] is not None:
        raw["model"] = dict(SIZES[size])
    raw["model"]["seq_length"] = seq_length
    raw["parallel"] = {"tp": 1, "pp": 1}
    run = load_config(raw=raw)
    par = Parallel.initialize(ParallelConfig(), seed=run.seed)
    chunks, _ = build_model(run, par, torch.float32)
    for c in chunks:
        c.eval()
    text = workdir / "words.txt"
    text.write_text(_words(2000, 0))
    tok = train_sentencepiece([text], workdir / "tokenizer.model", vocab_size=320, threads=1)
    return CheckpointModel(chunks, run, tok, Path(f"random-init {size} model"), batch_size=16, parallel=par)


def _requests(model, n: int, seed: int = 0):
    """``n`` image questions: 8-24 ordinary token ids after the image prefix, random embeddings."""
    import numpy as np
    import torch

    from megavlm.data.tokenizer import FIRST_ORDINARY_ID

    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    hi = min(model.tok.vocab_size, model.run.model.vocab_size)
    prompts = [rng.integers(FIRST_ORDINARY_ID, hi, int(rng.integers(8, 25))).tolist() for _ in range(n)]
    images = [torch.randn(model.num_patches, model.run.model.vision.embed_dim, generator=g) for _ in range(n)]
    return prompts, images


def time_generation(model, new_tokens: list[int], batch_sizes: list[int], repeats: int,
                    log=print) -> list[GenRow]:
    """Cached vs uncached generation at every (new tokens, batch) pair, alternating the order."""
    prompts, images = _requests(model, max(batch_sizes))
    model.generate_ids(prompts[:1], images[:1], max_new_tokens=2)  # warm-up, both paths
    model.generate_ids(prompts[:1], images[:1], max_new_tokens=2, cache=False)
    rows = []
    for n in new_tokens:
        for bs in batch_sizes:
            model.batch_size = bs
            times: dict[bool, list[float]] = {True: [], False: []}
            outs: dict[bool, list] = {True: [], False: []}
            for r in range(repeats):
                for cache in ((True, False) if r % 2 == 0 else (False, True)):
                    t0 = time.perf_counter()
                    ids = model.generate_ids(prompts[:bs], images[:bs], max_new_tokens=n, cache=cache)
                    times[cache].append(time.perf_counter() - t0)
                    outs[cache].append(ids)
            same = all(o == outs[False][0] for o in outs[True] + outs[False])
            row = GenRow(n, bs, sum(map(len, outs[True][0])), times[True], times[False], same)
            log(f"{n} new tokens, batch {bs}: cached {statistics.median(row.cached):.3f} s, uncached "
                f"{statistics.median(row.uncached):.3f} s ({row.speedup:.1f}x), same tokens: {same}")
            rows.append(row)
    return rows


def _ints(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return out


def generation_main(argv: list[str]) -> int:
    from megavlm.bench.artifact import load_average, machine_info, write_report
    from megavlm.eval.runner import CheckpointModel

    ap = argparse.ArgumentParser(prog="python -m megavlm.bench.eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="checkpoint directory (default: a random-init model)")
    ap.add_argument("--size", choices=sorted(SIZES), default="demo", help="random-init model size")
    ap.add_argument("--new-tokens", type=_ints, default=[32, 128])
    ap.add_argument("--batch-sizes", type=_ints, default=[1, 16])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks")
    a = ap.parse_args(argv)
    if a.repeats < 1:
        ap.error(f"--repeats must be at least 1, got {a.repeats}")
    info = machine_info()  # before the runs: the load average is the machine's
    with tempfile.TemporaryDirectory() as tmp:
        if a.checkpoint:
            model = CheckpointModel.load(a.checkpoint)
            source = f"checkpoint `{a.checkpoint}`"
        else:
            seq = -(-(max(a.new_tokens) + 64 + 1) // 64) * 64  # a 64-multiple above prompt + new tokens
            model = random_model(a.size, seq, Path(tmp))
            source = (f"the {a.size} model section (launch/configs/demo.yaml), random init, seq_length "
                      f"raised to {seq} so the longest run fits")
        rows = time_generation(model, a.new_tokens, a.batch_sizes, a.repeats)
    m = model.run.model
    args = "".join(" " + shlex.quote(x) for x in argv)
    date = time.strftime("%Y-%m-%d", time.gmtime())
    lines = [f"# Generation with and without the KV cache on CPU ({date})", "",
             f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} python -m megavlm.bench.eval{args}` "
             f"(the same as `megavlm bench eval{args}`)", "",
             f"Model: {source}: {m.num_layers} layers, d_model {m.hidden_size}, {m.num_attention_heads} heads, "
             f"vocab {m.vocab_size}, seq {m.seq_length}, {m.vision.num_patches} patches x {m.vision.embed_dim}, "
             "fp32, one process.", "",
             "Workload: greedy `CheckpointModel.generate_ids`, image rows (the image prefix, then 8-24 "
             "question tokens), random image embeddings; batches of the first B rows. `cached`: the "
             "prompts once, then one token per row over the KV cache; `uncached`: every new token re-runs "
             f"the prefix. {a.repeats} repeats each, alternating which runs first; medians.", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines += [f"- load average at the end (1/5/15 min): {load_average()} (other jobs shared the machine; "
              "ratios within this run are the comparable figures)", "",
              "| new tokens | batch | tokens generated | cached s | uncached s | cached tokens/s | "
              "uncached tokens/s | speed-up | same tokens |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c, u = statistics.median(r.cached), statistics.median(r.uncached)
        lines.append(f"| {r.new_tokens} | {r.batch} | {r.generated} | {c:.4f} | {u:.4f} | {r.generated / c:.1f} | "
                     f"{r.generated / u:.1f} | {r.speedup:.1f}x | {'yes' if r.same else 'NO'} |")
    lines.append("")
    f = write_report(a.out, "cpu", "eval-generation", "\n".join(lines))
    print(f.read_text())
    return 0 if all(r.same for r in rows) else 1


def _text_rate(model, tasks, include, limit) -> tuple[int, float, dict]:
    from megavlm.demo import suites

    t0 = time.perf_counter()
    res = suites.run_text(model, tasks, include, limit, include_defaults=False)
    dt = time.perf_counter() - t0
    n = sum(int(res["n-samples"][t]["effective"]) for t in tasks)
    return n, dt, suites.text_accuracies(res)


def suites_main(argv: list[str]) -> int:
    from megavlm.bench.artifact import load_average, machine_info, write_report
    from megavlm.demo import suites
    from megavlm.eval.api import resolve_prompt
    from megavlm.eval.runner import CheckpointModel

    ap = argparse.ArgumentParser(prog="python -m megavlm.bench.eval --suites", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--demo-root", default=None)
    ap.add_argument("--wordnet", default=None)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--limit", type=int, default=None, help="examples per task (default: all)")
    ap.add_argument("--out", default="benchmarks")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    info = machine_info(("lm-eval",))  # before the runs: the load average is the machine's
    model = CheckpointModel.load(a.checkpoint, batch_size=a.batch_size)
    src = suites.Sources.default(a.demo_root, a.wordnet)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        include = suites.write_text_suite(tmp, src)
        n, dt, acc = _text_rate(model, list(suites.TEXT_SUITE), include, a.limit)
        rows.append(("text suite (lm-eval, 4-way log-likelihood)", a.batch_size, n, dt, acc))
        for bs in (1, a.batch_size):
            model.batch_size = bs
            n, dt, acc = _text_rate(model, ["megavlm_wordnet_mc"], include, 50)
            rows.append(("megavlm_wordnet_mc, 50 docs", bs, n, dt, acc))
        model.batch_size = a.batch_size
    template = resolve_prompt(model).template  # asked as the checkpoint was trained
    for r in suites.run_vision_suite(model, src, a.limit, template=template):
        extra = {"accuracy": r.accuracy} if r.accuracy is not None else {"perplexity": r.metrics["perplexity"]}
        rows.append((r.task, a.batch_size, r.n, r.seconds, extra))
    m = model.run.model
    date = time.strftime("%Y-%m-%d", time.gmtime())
    cmd = "python -m megavlm.bench.eval --suites " + " ".join(argv)
    lines = [f"# Offline evaluation throughput on CPU ({date})", "",
             f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} {cmd}`", "",
             f"Checkpoint `{Path(a.checkpoint).name}` of stage {model.path.parents[1].name}: "
             f"{m.num_layers} layers, d_model {m.hidden_size}, vocab {m.vocab_size}, seq {m.seq_length}, "
             f"{m.vision.num_patches} patches x {m.vision.embed_dim}.", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines += [f"- load average at the end (1/5/15 min): {load_average()} (other jobs shared the machine; "
              "ratios within this run are the comparable figures)", "",
             "| workload | batch | questions | seconds | questions/s | result |", "|---|---|---|---|---|---|"]
    for name, bs, n, dt, res in rows:
        shown = ", ".join(f"{k} {v:.3f}" for k, v in res.items())
        lines.append(f"| {name} | {bs} | {n} | {dt:.1f} | {n / dt:.1f} | {shown} |")
    b1, bb = rows[1], rows[2]
    lines += ["", f"Batching: {bb[2] / bb[3] / (b1[2] / b1[3]):.1f}x the questions/s of one request per "
              f"forward on the same task (lm-eval overhead included).",
              "Generation (fashion_vqa) runs with the KV cache; an undertrained model often talks "
              "until the sequence is full (cached vs uncached: `python -m megavlm.bench.eval`).", ""]
    f = write_report(a.out, "cpu", "eval", "\n".join(lines))
    print(f.read_text())
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--suites" in argv:
        argv.remove("--suites")
        return suites_main(argv)
    return generation_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
