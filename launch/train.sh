#!/usr/bin/env bash
# Train on whatever this machine has, through the deepspeed launcher:
# every GPU (NCCL), or 2 processes on the CPU (gloo).
#
#   bash launch/train.sh                                  # configs/tiny.toml
#   bash launch/train.sh configs/gpt2_small_16k.toml --set train.steps=50
#   NPROC=4 bash launch/train.sh ...                      # choose the process count
#
# Other launchers: launch/deepspeed.sh (hostfile, several nodes), launch/torchrun.sh,
# launch/mpirun.sh. Extra arguments go to the training entry point
# (python -m dist_sparse_attn.train --help).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PY:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
BIN="$(dirname "$PY")"
CONFIG="configs/tiny.toml"
if [ $# -gt 0 ] && [[ "$1" != --* ]]; then CONFIG="$1"; shift; fi
NGPU="$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
if [ -z "${NPROC:-}" ]; then
    if [ "$NGPU" -gt 0 ]; then NPROC="$NGPU"; else NPROC=2; fi
fi
DS="$BIN/deepspeed"; [ -x "$DS" ] || DS=deepspeed
echo "[launch] $NPROC process(es) on $([ "$NGPU" -gt 0 ] && echo "$NGPU GPU(s)" || echo CPU), config $CONFIG"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# --num_gpus sets the process count (also on CPU, where the launcher starts N gloo ranks)
exec "$DS" --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29531}" \
    launch/train.py --config "$CONFIG" "$@"
