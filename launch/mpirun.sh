#!/usr/bin/env bash
# mpirun: MPI starts the processes, mpi4py supplies rank, world size and the master
# address (DeepSpeed's MPI discovery); NCCL or gloo carry the traffic as usual.
#
#   bash launch/mpirun.sh [config] [--set ...]            # NPROC processes on this node
#   MPI_HOSTS=node-a:4,node-b:4 bash launch/mpirun.sh ...   # several nodes (MPICH -hosts)
#
# NPROC is the total process count (mpirun -n): by default every GPU, or 2 on a CPU-only
# machine, and with MPI_HOSTS the sum of its hosts' counts (a host without ":N" counts 1,
# as MPICH reads it; with fewer, mpirun would fill the first hosts and leave the others
# idle). Uses the mpirun of the venv (the mpich wheel) when present; MPI_ARGS adds flags
# (e.g. Open MPI's --allow-run-as-root).
set -euo pipefail
if [ -n "${MPI_HOSTS:-}" ] && [ -z "${NPROC:-}" ]; then
    NPROC=0
    IFS=, read -ra _hosts <<<"$MPI_HOSTS"
    for _h in "${_hosts[@]}"; do
        [ -n "$_h" ] || continue
        if [[ "$_h" == *:* ]]; then _n="${_h##*:}"; else _n=1; fi
        if ! [[ "$_n" =~ ^[0-9]+$ ]]; then
            echo "[launch] MPI_HOSTS: '$_h' is not host or host:count (MPI_HOSTS=$MPI_HOSTS)" >&2
            exit 2
        fi
        NPROC=$(( NPROC + 10#$_n ))
    done
    if [ "$NPROC" -lt 1 ]; then
        echo "[launch] MPI_HOSTS names no process (MPI_HOSTS=$MPI_HOSTS)" >&2
        exit 2
    fi
fi
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
MPIRUN="$(dirname "$PY")/mpirun"; [ -x "$MPIRUN" ] || MPIRUN=mpirun
HOSTS=()
if [ -n "${MPI_HOSTS:-}" ]; then HOSTS=(-hosts "$MPI_HOSTS"); fi
preflight "$NPROC" "$@"      # -n is the total process count, also with -hosts
# shellcheck disable=SC2086
exec "$MPIRUN" -n "$NPROC" "${HOSTS[@]}" ${MPI_ARGS:-} "$PY" launch/train.py --config "$CONFIG" "$@"
