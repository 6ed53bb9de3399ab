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
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
DS="$BIN/deepspeed"; [ -x "$DS" ] || DS=deepspeed
preflight "$NPROC" "$@"
# --num_gpus sets the process count (also on CPU, where the launcher starts N gloo ranks)
exec "$DS" --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29531}" \
    launch/train.py --config "$CONFIG" "$@"
