"""``megavlm demo``: the offline main job.

Builds (or reuses) the small real corpus, then trains the tiny recipe's three stages on one
process: text pre-training with checkpoints at 20/40/60/80/100 %, image-text pre-training
resumed from the 80 % checkpoint with the text cosine continued, and instruction tuning with a
re-warmed cosine. It ends with a per-stage summary read back from ``metrics.jsonl``. Re-running
reuses the corpus cache and resumes (finished stages are skipped).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "launch" / "configs" / "tiny.yaml"


def summarize(run_dir: Path) -> str:
    rows = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        r = rows.setdefault(m["stage"], {"first": m, "last": m, "tokens": 0, "time": 0.0})
        r["last"] = m
        r["tokens"] += m["tokens"]
        r["time"] += m["tokens"] / max(m["tokens_per_s"], 1e-9)
    out = ["| stage | steps | loss first → last | lr first → last | tokens | tokens/s |",
           "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        f, last = r["first"], r["last"]
        out.append(f"| {name} | {last['step']} | {f['loss']:.3f} → {last['loss']:.3f} | "
                   f"{f['lr']:.2e} → {last['lr']:.2e} | {r['tokens']:,} | {r['tokens'] / r['time']:,.0f} |")
    return "\n".join(out)


def main(args) -> int:
    from megavlm.config import load_config
    from megavlm.parallel.state import Parallel
    from megavlm.train.stages import run_stages

    overrides = [f"run_dir={args.run_dir}"] + list(args.overrides or [])
    run = load_config(args.config or DEFAULT_CONFIG, overrides)
    t0 = time.perf_counter()
    parallel = Parallel.initialize(run.parallel, run.seed)
    try:
        run_stages(run, parallel)
    finally:
        parallel.destroy()
    run_dir = Path(run.run_dir)
    print(f"\nmegavlm demo finished in {time.perf_counter() - t0:.0f} s — run directory {run_dir}")
    print(summarize(run_dir))
    return 0
