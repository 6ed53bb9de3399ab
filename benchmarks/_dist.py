"""Process-group start shared by the torchrun benchmark scripts (bench_parallel.py,
check_parallel_gpu.py): one GPU per rank from LOCAL_RANK with NCCL, or gloo on the CPU;
a plain ``python script.py`` becomes a world of one."""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from dist_sparse_attn.distributed import free_port


def init_process_group(cuda: bool, timeout_s: float, threads: int = 1):
    """Bind this rank's device and start the default group; returns the device."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        # one thread per rank by default (what torchrun gives P > 1): P=1 then compares
        # with P=2 like for like, and OpenMP spin-waits do not fight other processes
        torch.set_num_threads(threads)
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    kw = dict(backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    if cuda:
        kw["device_id"] = device
    try:
        dist.init_process_group(**kw)
    except TypeError:                     # older torch without device_id
        kw.pop("device_id", None)
        dist.init_process_group(**kw)
    return device
