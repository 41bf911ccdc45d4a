"""Evaluation throughput on the offline suites (questions/s), written as a dated benchmark artifact.

    python -m megavlm.eval.bench --checkpoint C [--demo-root R] [--batch-size 16] [--out benchmarks/]

Loads the checkpoint once and times, in the same process: the offline text suite through lm-eval
(questions = documents; each is 4 batched log-likelihood requests), the same WordNet task at batch
size 1 vs the chosen batch size (the batching ratio), and each offline vision task. Writes
``<out>/<date>-cpu-eval.md`` with the command that produced it.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional


def _text_rate(model, tasks, include, limit) -> tuple[int, float, dict]:
    from megavlm.eval import suites

    t0 = time.perf_counter()
    res = suites.run_text(model, tasks, include, limit, include_defaults=False)
    dt = time.perf_counter() - t0
    n = sum(int(res["n-samples"][t]["effective"]) for t in tasks)
    return n, dt, suites.text_accuracies(res)


def main(argv: Optional[list[str]] = None) -> int:
    from megavlm.eval import suites
    from megavlm.eval.runner import CheckpointModel

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--demo-root", default=None)
    ap.add_argument("--wordnet", default=None)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--limit", type=int, default=None, help="examples per task (default: all)")
    ap.add_argument("--out", default="benchmarks")
    a = ap.parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch

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
    for r in suites.run_vision_suite(model, src, a.limit):
        extra = {"accuracy": r.accuracy} if r.accuracy is not None else {"perplexity": r.metrics["perplexity"]}
        rows.append((r.task, a.batch_size, r.n, r.seconds, extra))
    load = os.getloadavg()[0]  # shared machines: a high load stretches every timing below
    m = model.run.model
    date = time.strftime("%Y-%m-%d", time.gmtime())
    cmd = "python -m megavlm.eval.bench " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [f"# Offline evaluation throughput on CPU ({date})", "",
             f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} {cmd}`", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"torch {torch.__version__} with {torch.get_num_threads()} threads. Checkpoint "
             f"`{Path(a.checkpoint).name}` of stage {model.path.parents[1].name}: {m.num_layers} layers, "
             f"d_model {m.hidden_size}, vocab {m.vocab_size}, seq {m.seq_length}, "
             f"{m.vision.num_patches} patches x {m.vision.embed_dim}. Load average at the end: "
             f"{load:.1f} on {os.cpu_count()} cores (other jobs shared the machine; ratios within "
             f"this run are the comparable figures).", "",
             "| workload | batch | questions | seconds | questions/s | result |", "|---|---|---|---|---|---|"]
    for name, bs, n, dt, res in rows:
        shown = ", ".join(f"{k} {v:.3f}" for k, v in res.items())
        lines.append(f"| {name} | {bs} | {n} | {dt:.1f} | {n / dt:.1f} | {shown} |")
    b1, bb = rows[1], rows[2]
    lines += ["", f"Batching: {bb[2] / bb[3] / (b1[2] / b1[3]):.1f}x the questions/s of one request per "
              f"forward on the same task (lm-eval overhead included).",
              "Generation (fashion_vqa) has no KV cache: each new token re-runs the batch's whole "
              "prefix, and an undertrained model often talks until the sequence is full.", ""]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    f = out / f"{date}-cpu-eval.md"
    f.write_text("\n".join(lines))
    print(f.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
