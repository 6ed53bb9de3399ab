#!/usr/bin/env bash
# torchrun: one node, or several (run this once on every node).
#
#   bash launch/torchrun.sh [config] [--set ...]                       # one node
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node-a bash launch/torchrun.sh ...  # on node-a
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node-a bash launch/torchrun.sh ...  # on node-b
#
# NPROC processes per node (default: every GPU, or 2 on a CPU-only machine). With
# NNODES > 1 the nodes meet at MASTER_ADDR:MASTER_PORT (c10d rendezvous, default
# port 29400, reachable from every node); all nodes must use the same NPROC, config
# and RDZV_ID. Sequence-parallel groups are blocks of consecutive ranks, so with
# train.sequence_parallel <= NPROC each group stays inside one node.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
NNODES="${NNODES:-1}"
preflight "$(( NPROC * NNODES ))" "$@"
if [ "$NNODES" -eq 1 ]; then
    exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
        launch/train.py --config "$CONFIG" "$@"
fi
exec "$PY" -m torch.distributed.run --nnodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK}" \
    --nproc_per_node "$NPROC" --rdzv_backend c10d --rdzv_id "${RDZV_ID:-dsa}" \
    --rdzv_endpoint "${MASTER_ADDR:?set MASTER_ADDR}:${MASTER_PORT:-29400}" \
    launch/train.py --config "$CONFIG" "$@"
