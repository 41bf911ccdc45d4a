#!/bin/bash
# Encode DataComp-DR WebDataset shards with the frozen image encoder on 8 GPUs of one node: torchrun
# starts 8 workers (RANK 0..7, one GPU each via LOCAL_RANK); worker r encodes the input shards
# i with i % 8 == r, one part per shard under OUTPUT.parts/ (temp name, then rename; a part with
# its done.json is never redone, so re-running after a crash or preemption resumes). The merge
# then joins the parts in shard order; the result does not depend on the number of workers.
#
#   launch/prep/encode-8gpu.sh 'datacomp/{00000000..00001023}.tar' data/paper/captions tokenizer.json
#
# Environment (optional): NPROC (default 8), ENCODER (default siglip:google/siglip-so400m-patch14-384),
# CAPTION (default 'syn.json:syn_text,txt': DataComp-DR's synthetic captions, else the alt text),
# CHOICE (first|hash, default hash), DTYPE (bfloat16|float8_e4m3, default bfloat16), BAD (raise|skip,
# default skip: bad members are listed in OUTPUT.rejects.jsonl), PYTHON (default python).
# Before starting: `megavlm prepare --plan --config launch/configs/paper-1b.yaml --inputs captions=...`
set -euo pipefail
INPUT=${1:?input shards (glob or brace range)}
OUTPUT=${2:?output prefix}
TOKENIZER=${3:?tokenizer (.model or tokenizer.json)}
NPROC=${NPROC:-8}
PYTHON=${PYTHON:-python}
cd "$(dirname "$0")/../.."
"$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" tools/encode_images.py \
  --input "$INPUT" --output "$OUTPUT" --tokenizer "$TOKENIZER" \
  --encoder "${ENCODER:-siglip:google/siglip-so400m-patch14-384}" \
  --caption "${CAPTION:-syn.json:syn_text,txt}" --caption-choice "${CHOICE:-hash}" \
  --dtype "${DTYPE:-bfloat16}" --bad-images "${BAD:-skip}" --batch-size 64 --no-progress
"$PYTHON" tools/encode_images.py --merge --output "$OUTPUT"
