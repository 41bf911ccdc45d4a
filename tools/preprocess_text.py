#!/usr/bin/env python
"""Tokenize text documents into a megatron-core .bin/.idx pair (EOD after each document).

    python tools/preprocess_text.py --input docs.jsonl --tokenizer tokenizer.model --output data/text --workers 2

Inputs: files, globs or brace ranges ('dclm/shard_{00000..00999}.jsonl.zst'); formats by suffix:
.jsonl / .json (one object a line, text under --field), .jsonl.zst (DCLM-baseline), .jsonl.gz,
.parquet (column --field), anything else plain text (documents separated by blank lines).

Parallel (--parts, on by default under torchrun or a SLURM array): each worker (RANK/WORLD_SIZE or
SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT) tokenizes its slice of the input shards into one part
per shard under OUTPUT.parts/; finished parts are kept across kills and never redone. A single
worker merges at the end; with several, run the same command once more with --merge afterwards.
--bad-input skip drops bad lines (and the rest of a corrupt .zst/.gz stream), counted and listed in
OUTPUT.rejects.jsonl; the default stops with the file and line named.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megavlm.helpformat import HelpFormatter  # noqa: E402

from megavlm.data.indexed import DataError  # noqa: E402
from megavlm.prep.textprep import preprocess_text  # noqa: E402
from megavlm.data.tokenizer import TokenizerError, load_tokenizer  # noqa: E402


def parallel_env() -> bool:
    return any(k in os.environ for k in ("WORLD_SIZE", "SLURM_ARRAY_TASK_ID"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--input", nargs="+", help="files, globs, brace ranges")
    ap.add_argument("--tokenizer", help="sentencepiece .model or tokenizer.json")
    ap.add_argument("--output", required=True, help="output prefix (writes PREFIX.bin and PREFIX.idx)")
    ap.add_argument("--workers", type=int, default=1, help="tokenizer processes (single-job mode)")
    ap.add_argument("--field", default="text", help="JSON field / parquet column of the text")
    ap.add_argument("--chunk-docs", type=int, default=256, help="documents per worker task")
    ap.add_argument("--bad-input", choices=["raise", "skip"], default="raise")
    ap.add_argument("--parts", action="store_true", help="one part per input shard (see above)")
    ap.add_argument("--merge", action="store_true", help="join the finished parts of OUTPUT.parts")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    if not a.merge and (not a.input or not a.tokenizer):
        ap.error("--input and --tokenizer are required (unless --merge)")
    from megavlm.prep.inputs import expand_inputs, my_shards, worker_rank
    from megavlm.prep import parts as P

    try:
        if a.merge:
            s = P.merge_parts(a.output)
            print(f"{a.output}: merged {s['parts']} parts, {s['records']} documents, {s['rejected']} rejected")
            return 0
        inputs = expand_inputs(a.input)
        skip = a.bad_input == "skip"
        if a.parts or parallel_env():
            rank, world = worker_rank()
            tok = load_tokenizer(a.tokenizer)
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            P.write_job(a.output, {"kind": "text", "outputs": ["tokens"], "inputs": [str(p) for p in inputs],
                                   "tokenizer": str(a.tokenizer), "field": a.field})
            from megavlm.prep.textparts import tokenize_part

            st = P.run_parts(a.output, my_shards(inputs, rank, world),
                             lambda shard, prefix, rej: tokenize_part(shard, prefix, rej, tokenizer=tok,
                                                                      field=a.field, chunk_docs=a.chunk_docs),
                             skip_bad=skip)
            print(f"{a.output}: worker {rank}/{world}: {st.done} parts made ({st.records} documents, "
                  f"{st.rejected} rejected), {st.reused} finished parts kept, in {st.seconds:.1f}s")
            if world == 1:
                s = P.merge_parts(a.output)
                print(f"{a.output}: merged {s['parts']} parts, {s['records']} documents, {s['rejected']} rejected")
            else:
                print(f"when every worker is done: python tools/preprocess_text.py --merge --output {a.output} "
                      f"--input {' '.join(a.input)} --tokenizer {a.tokenizer}")
            return 0
        rejects: list[str] = []
        st = preprocess_text(inputs, a.output, a.tokenizer, workers=a.workers, field=a.field,
                             chunk_docs=a.chunk_docs, progress=not a.no_progress,
                             reject=rejects.append if skip else None)
        if skip:
            tmp = Path(f"{a.output}.rejects.jsonl.tmp")
            tmp.write_text("".join(json.dumps({"problem": r}) + "\n" for r in rejects))
            tmp.replace(f"{a.output}.rejects.jsonl")
    except (DataError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{a.output}: {st.documents} documents, {st.tokens} tokens in {st.seconds:.2f}s = "
          f"{st.tokens_per_s:,.0f} tokens/s with {st.workers} worker(s)"
          + (f", {len(rejects)} rejected (listed in {a.output}.rejects.jsonl)" if skip else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
