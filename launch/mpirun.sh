#!/usr/bin/env bash
# mpirun: MPI starts the processes, mpi4py supplies rank, world size and the master
# address (DeepSpeed's MPI discovery); NCCL or gloo carry the traffic as usual.
#
#   bash launch/mpirun.sh [config] [--set ...]            # NPROC processes on this node
#   MPI_HOSTS=node-a:4,node-b:4 bash launch/mpirun.sh ...   # several nodes (MPICH -hosts)
#
# NPROC defaults to every GPU, or 2 on a CPU-only machine. Uses the mpirun of the venv
# (the mpich wheel) when present; MPI_ARGS adds flags (e.g. Open MPI's --allow-run-as-root).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
MPIRUN="$(dirname "$PY")/mpirun"; [ -x "$MPIRUN" ] || MPIRUN=mpirun
HOSTS=()
if [ -n "${MPI_HOSTS:-}" ]; then HOSTS=(-hosts "$MPI_HOSTS"); fi
preflight "$NPROC" "$@"      # -n is the total process count, also with -hosts
# shellcheck disable=SC2086
exec "$MPIRUN" -n "$NPROC" "${HOSTS[@]}" ${MPI_ARGS:-} "$PY" launch/train.py --config "$CONFIG" "$@"
