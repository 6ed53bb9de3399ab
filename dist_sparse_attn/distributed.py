"""Process-group start for the training entry point, and agreement between ranks.

* :func:`init_distributed`: torch.distributed through DeepSpeed under any launcher
  (torchrun and the deepspeed launcher set env:// variables; under ``mpirun``
  DeepSpeed's MPI discovery reads rank, world size and master address with mpi4py; a
  plain ``python`` run becomes a world of one).
* :func:`launch_rank` / :func:`launch_world`: what the launcher says before any process
  group exists (so that only rank 0 reports a configuration error).
* :func:`agree`: run a check on every rank; an error on any rank stops all of them.
* :func:`free_port`: a free TCP port for a rendezvous on this host.
* :func:`release_deepspeed_shm`: nothing of DeepSpeed's CPU all-reduce left in /dev/shm.
"""
from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist

_MPI_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago (bound to port 0, released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_int(*names):
    """The first of the launcher variables ``names`` that is set, as an int (else None)."""
    for name in names:
        value = os.environ.get(name)
        if value is not None and value.strip().lstrip("-").isdigit():
            return int(value)
    return None


def launch_rank() -> int:
    """This process's rank as the launcher set it (0 without a launcher)."""
    return _env_int("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK") or 0


def launch_world() -> int | None:
    """The world size the launcher set (None without a launcher)."""
    return _env_int("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def init_distributed(cuda: bool, timeout_min: float):
    """Start torch.distributed through DeepSpeed: env:// under torchrun and the deepspeed
    launcher; under mpirun DeepSpeed's MPI discovery (mpi4py) supplies rank, world size
    and the master address; a plain ``python`` run becomes a world of one."""
    import deepspeed
    launched = all(v in os.environ for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
    if not launched and not any(v in os.environ for v in _MPI_VARS):
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    if cuda:    # bind the GPU before NCCL starts (LOCAL_RANK is set by every launcher)
        local = int(os.environ.get("LOCAL_RANK", os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK",
                                                                  os.environ.get("MPI_LOCALRANKID", 0))))
        torch.cuda.set_device(local % torch.cuda.device_count())
    # under mpirun DeepSpeed's MPI discovery sets MASTER_PORT to distributed_port: pass the
    # caller's, or two jobs on one host would both take 29500
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=True,
                               distributed_port=int(os.environ.get("MASTER_PORT", 29500)),
                               timeout=datetime.timedelta(minutes=timeout_min))
    if cuda and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    if not cuda:
        release_deepspeed_shm()


# DeepSpeed's CPU all-reduce over shared memory (the `deepspeed_shm_comm` op; used when
# LOCAL_SIZE equals the world size, as under the deepspeed launcher on one host) gives
# every rank a 66 MB POSIX segment named after the master address and port, and never
# removes it: each run would leave its segments in /dev/shm until that memory is full.
SHM_DIR = "/dev/shm"
_DS_SHM_PREFIX = "deepspeed_allreduce_buffer_"


def deepspeed_shm_names(addr: str, port, ranks) -> list[str]:
    """The /dev/shm names DeepSpeed's CPU all-reduce gives ``ranks`` of the job whose
    master is ``addr:port`` (owned by this user)."""
    return [f"{_DS_SHM_PREFIX}{os.getuid()}_{addr}_{port}_{r}" for r in ranks]


def deepspeed_shm_segments() -> set[str]:
    """The names of every segment of DeepSpeed's CPU all-reduce in /dev/shm now."""
    if not os.path.isdir(SHM_DIR):
        return set()
    return {n for n in os.listdir(SHM_DIR) if n.startswith(_DS_SHM_PREFIX)}


def remove_deepspeed_shm(names) -> None:
    """Unlink these /dev/shm segments (names of :func:`deepspeed_shm_names` or
    :func:`deepspeed_shm_segments`); missing ones are skipped."""
    for name in names:
        try:
            os.unlink(os.path.join(SHM_DIR, name))
        except FileNotFoundError:
            pass


def release_deepspeed_shm():
    """Collective, after ``deepspeed.init_distributed``: unlink this rank's shared-memory
    segment of DeepSpeed's CPU all-reduce. Every rank maps the others' segments while
    DeepSpeed initializes (and never opens them again), so after a barrier the names are
    no longer needed; the memory stays mapped until the processes exit, and nothing is
    left behind in /dev/shm."""
    if not dist.is_initialized() or not os.path.isdir(SHM_DIR):
        return
    dist.barrier()
    remove_deepspeed_shm(deepspeed_shm_names(os.environ.get("MASTER_ADDR", ""),
                                             os.environ.get("MASTER_PORT", ""),
                                             [dist.get_rank()]))


def peer_failure(e: BaseException) -> str | None:
    """What a collective's error says about the other ranks, or None if it is not that."""
    text = str(e).lower()
    if "timed out" in text or "timeout" in text:
        return "a collective did not complete in time: another rank stalled or died"
    if "connection closed by peer" in text or "connection reset" in text \
            or "broken pipe" in text:
        return "another rank closed its connection (it died or stopped)"
    return None


def raise_if_any(message: str | None, error=RuntimeError):
    """Collective: every rank passes its error message (or None); if any rank has one,
    every rank raises ``error`` with the first one (so no rank waits for the others in
    a later collective)."""
    messages = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    first = next((m for m in messages if m), None)
    if first:
        raise error(first)


def agree(fn, *args, error=RuntimeError):
    """``fn(*args)`` on every rank; an ``error`` or OSError raised on any rank becomes an
    ``error`` on all of them (:func:`raise_if_any`). Returns this rank's result."""
    out, err = None, None
    try:
        out = fn(*args)
    except error as e:
        err = str(e)
    except OSError as e:
        err = f"{e.filename or ''}: {e.strerror or e}".lstrip(": ")
    raise_if_any(err, error)
    return out


__all__ = ["free_port", "launch_rank", "launch_world", "init_distributed", "peer_failure",
           "raise_if_any", "agree", "deepspeed_shm_names", "deepspeed_shm_segments",
           "remove_deepspeed_shm", "release_deepspeed_shm"]
