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
#
# A HOSTFILE that cannot be read, or lists no slots, stops here (exit 2): the deepspeed
# launcher itself would only log a warning and train on this node's devices alone.
# A relative HOSTFILE is relative to the directory the script is started from.
set -euo pipefail
if [ -n "${HOSTFILE:-}" ] && [[ "$HOSTFILE" != /* ]]; then HOSTFILE="$PWD/$HOSTFILE"; fi
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
DS="$(dirname "$PY")/deepspeed"; [ -x "$DS" ] || DS=deepspeed
if [ -n "${HOSTFILE:-}" ]; then
    if [ ! -f "$HOSTFILE" ] || [ ! -r "$HOSTFILE" ]; then
        echo "[launch] HOSTFILE=$HOSTFILE is not a readable file" >&2
        exit 2
    fi
    # world size: the slots of the hostfile's hosts ("hostname slots=N" lines)
    SLOTS="$(awk '!/^[[:space:]]*#/ { for (i = 2; i <= NF; i++) if ($i ~ /^slots=[0-9]+$/) { sub("slots=", "", $i); n += $i } } END { if (n) print n }' "$HOSTFILE")"
    if [ -z "$SLOTS" ]; then
        echo "[launch] HOSTFILE=$HOSTFILE lists no 'hostname slots=N' line" >&2
        exit 2
    fi
    preflight "$SLOTS" "$@"
    exec "$DS" --hostfile "$HOSTFILE" --master_port "${MASTER_PORT:-29500}" \
        launch/train.py --config "$CONFIG" "$@"
fi
preflight "$NPROC" "$@"
exec "$DS" --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29500}" \
    launch/train.py --config "$CONFIG" "$@"
