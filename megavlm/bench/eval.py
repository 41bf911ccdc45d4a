"""Evaluation throughput on the offline suites (questions/s), written as a dated benchmark artifact.

    python -m megavlm.bench.eval --checkpoint C [--demo-root R] [--batch-size 16] [--out benchmarks/]

Loads the checkpoint once and times, in the same process: the offline text suite through lm-eval
(questions = documents; each is 4 batched log-likelihood requests), the same WordNet task at batch
size 1 vs the chosen batch size (the batching ratio), and each offline vision task. Writes
``<out>/<date>-cpu-eval.md`` with the command that produced it.
"""

from __future__ import annotations

import argparse
import os
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
    from megavlm.bench.artifact import load_average, machine_info, write_report
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
    for r in suites.run_vision_suite(model, src, a.limit):
        extra = {"accuracy": r.accuracy} if r.accuracy is not None else {"perplexity": r.metrics["perplexity"]}
        rows.append((r.task, a.batch_size, r.n, r.seconds, extra))
    m = model.run.model
    date = time.strftime("%Y-%m-%d", time.gmtime())
    cmd = "python -m megavlm.bench.eval " + " ".join(sys.argv[1:] if argv is None else argv)
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
              "Generation (fashion_vqa) has no KV cache: each new token re-runs the batch's whole "
              "prefix, and an undertrained model often talks until the sequence is full.", ""]
    f = write_report(a.out, "cpu", "eval", "\n".join(lines))
    print(f.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
