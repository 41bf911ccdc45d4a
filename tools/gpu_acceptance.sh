#!/usr/bin/env bash
# The GPU acceptance run: one bounded script for a lent GPU machine (no network, its own torch and
# Triton). Installs megatron-core (and Liger / Cut Cross-Entropy for the masked-CE comparison)
# offline from wheels carried in .whl/, runs `megavlm selftest --size full` with the fused masked
# CE forced, then the GPU-marked tests. Every step is bounded with `timeout -s INT` so a SIGINT
# lets the selftest write the report of what ran so far.
#
#   OUT=/some/dir bash tools/gpu_acceptance.sh [SELFTEST_SECONDS] [PYTEST_SECONDS]
#
# Reports (dated markdown) and logs go to $OUT; at most 8 files, so only what is needed.
set -u
OUT=${OUT:?set OUT to the folder the reports go to}
SELFTEST_S=${1:-300}
PYTEST_S=${2:-150}
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
log="$OUT/gpu-acceptance.log"

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >>"$log" 2>&1 || { echo "wheel install failed" | tee -a "$log"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi

{
  echo "== $(date -u +%FT%TZ) machine"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import sys, torch, triton, megatron.core as m; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'mcore', m.__version__, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))"
} >>"$log" 2>&1

echo "== $(date -u +%FT%TZ) selftest (full size, fused masked CE forced, ${SELFTEST_S}s)" | tee -a "$log"
MEGAVLM_MASKED_CE=fused timeout -s INT -k 20 "$SELFTEST_S" \
  python3 -m megavlm selftest --size full --out-dir "$OUT" >>"$log" 2>&1
echo "selftest rc=$?" | tee -a "$log"

echo "== $(date -u +%FT%TZ) pytest -m gpu (${PYTEST_S}s)" | tee -a "$log"
timeout -s INT -k 20 "$PYTEST_S" python3 -m pytest -q -m gpu -p no:cacheprovider \
  -o addopts="" --continue-on-collection-errors -rs \
  tests/model tests/kernels tests/train/test_collective_devices.py tests/bench tests/ops \
  tests/test_selftest.py >>"$log" 2>&1
echo "pytest rc=$?" | tee -a "$log"
echo "== $(date -u +%FT%TZ) done" | tee -a "$log"
tail -n 60 "$log"
