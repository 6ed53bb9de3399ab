#!/usr/bin/env bash
# The deepspeed launcher: one node, or several through a hostfile.
#
#   bash launch/deepspeed.sh [config] [--set sec.field=value ...]
#   HOSTFILE=launch/hostfile.example bash launch/deepspeed.sh configs/gpt2_small_128k_sp4.toml
#
# One node: NPROC processes (default: every GPU, or 2 on a CPU-only machine).
# Several nodes: a hostfile lists "hostname slots=N" per node (launch/hostfile.example);
# the launcher reaches the other nodes by passwordless ssh, starts N processes on each,
# and every node needs this repository (same path) and its .venv. MASTER_ADDR is the
# first host; MASTER_PORT (default 29500) must be open between the nodes. NCCL picks
# the network; set NCCL_SOCKET_IFNAME / NCCL_IB_HCA if it picks the wrong one.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
DS="$(dirname "$PY")/deepspeed"; [ -x "$DS" ] || DS=deepspeed
if [ -n "${HOSTFILE:-}" ]; then
    # world size: the slots of the hostfile's hosts ("hostname slots=N" lines)
    preflight "$(awk '!/^[[:space:]]*#/ { for (i = 2; i <= NF; i++) if ($i ~ /^slots=[0-9]+$/) { sub("slots=", "", $i); n += $i } } END { if (n) print n }' "$HOSTFILE" 2>/dev/null)" "$@"
    exec "$DS" --hostfile "$HOSTFILE" --master_port "${MASTER_PORT:-29500}" \
        launch/train.py --config "$CONFIG" "$@"
fi
preflight "$NPROC" "$@"
exec "$DS" --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29500}" \
    launch/train.py --config "$CONFIG" "$@"
