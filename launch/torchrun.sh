#!/usr/bin/env bash
# Train a megavlm recipe on ONE node with N processes (one per GPU; gloo processes on a CPU box).
#
#   launch/torchrun.sh CONFIG [--stage NAME] [key.path=value ...]
#
#   NPROC=8 launch/torchrun.sh launch/configs/dclm-1b.yaml
#   NPROC=8 launch/torchrun.sh launch/configs/dclm-7b.yaml parallel.tp=4 parallel.recompute=full
#   NPROC=1 launch/torchrun.sh launch/configs/dclm-1b.yaml train.fp8=delayed
#
# The layout is config: parallel.tp / parallel.pp / parallel.vpp (data parallel = NPROC / (tp*pp)),
# parallel.sequence_parallel=true|false, parallel.recompute=none|selective|full,
# train.fp8=none|delayed|current, model.backend=auto|te|local.
#
# Environment:
#   NPROC          processes on this node (default: number of GPUs nvidia-smi lists, else 1)
#   PYTHON         interpreter (default: python)
#   MEGAVLM_ENTRY  python module to run (default: megavlm, i.e. `python -m megavlm`)
#   MEGAVLM_CMD    its subcommand (default: train; empty for a module that takes none, e.g.
#                  MEGAVLM_ENTRY=megavlm.bench.throughput MEGAVLM_CMD= for a multi-GPU benchmark)
#   OMP_NUM_THREADS  per process (default 1 when unset, as torchrun would)
# Rendezvous is torchrun --standalone (a free local port), so two jobs on one node never collide.
# SIGTERM / SIGUSR1 to this script reach every worker (through the torchrun agent, which waits
# MEGAVLM_STOP_GRACE s, default 240, before SIGKILL): the run saves a checkpoint at the current
# step and this script exits 75 (re-run it to resume); see README "Long runs on a cluster".
set -euo pipefail

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
CONFIG=$1
shift
if [[ ! -f "$CONFIG" ]]; then
    echo "torchrun.sh: config file not found: $CONFIG" >&2
    exit 2
fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python}
if [[ -z "${NPROC:-}" ]]; then
    NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || NPROC=1
fi
ENTRY=${MEGAVLM_ENTRY:-megavlm}
CMD=${MEGAVLM_CMD-train}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# megatron-core needs one CUDA connection for its TP/SP communication-compute ordering
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

STOP_GRACE=${MEGAVLM_STOP_GRACE:-240}
OWN_EXIT_FILE=
if [[ -z "${MEGAVLM_EXIT_FILE:-}" ]]; then
    OWN_EXIT_FILE=$(mktemp -t megavlm-exit.XXXXXX)
    export MEGAVLM_EXIT_FILE=$OWN_EXIT_FILE
fi
: > "$MEGAVLM_EXIT_FILE"

# Traps first: a signal that comes while torchrun starts is passed on once it runs (otherwise it
# would end this script and leave torchrun running in its own process group).
PID=
STOP_SIG=
stop() {
    STOP_SIG=$1
    if [[ -n "$PID" ]]; then kill -s "$1" "$PID" 2>/dev/null || true; fi
}
trap 'stop USR1' USR1
trap 'stop TERM' TERM
trap 'stop TERM' INT
set -m  # torchrun in its own process group: Ctrl-C reaches this script, which asks for a clean stop
set -x
"$PYTHON" -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node="$NPROC" \
    --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout="$STOP_GRACE" \
    -m "$ENTRY" $CMD --config "$CONFIG" "$@" &
{ set +x; } 2>/dev/null
PID=$!
if [[ -n "$STOP_SIG" ]]; then kill -s "$STOP_SIG" "$PID" 2>/dev/null || true; fi
rc=0
while :; do  # a trapped signal ends `wait` early: wait again until torchrun is gone
    wait "$PID" && rc=0 || rc=$?
    kill -0 "$PID" 2>/dev/null || break
done
code=$(cat "$MEGAVLM_EXIT_FILE" 2>/dev/null || true)
[[ -n "$OWN_EXIT_FILE" ]] && rm -f "$OWN_EXIT_FILE"
[[ "$code" == 75 ]] && exit 75
exit "$rc"
