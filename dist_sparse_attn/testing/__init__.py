"""Helpers to check and measure the library (used by ``tests/`` and ``benchmarks/``).

* :mod:`.check_parallel` -- the correctness check of the sequence-parallel strategies
  against the single-device op (NCCL on GPUs, gloo on the CPU); its command line is
  ``benchmarks/check_parallel_gpu.py``.
* :func:`local_attention_ms` -- the local attention time of a profiled step, from the
  profiler ranges the strategies open (no patching of the library).
* :func:`bucket_costs` -- the bucket strategy's compute cost per owner rank.
"""
from __future__ import annotations

from typing import List

import torch

from ..parallel import _comm, routing

# the autograd node of ops.BucketedAttentionFunction: the profiler records its backward
# under this name (the engine's own range, at no cost to the library)
ATTENTION_BACKWARD = "BucketedAttentionFunctionBackward"


def local_attention_ms(prof, *, cuda: bool, backward: bool = True,
                       extra_ranges=()) -> float:
    """Milliseconds of local attention in a finished ``torch.profiler.profile``.

    Counts the forward ranges ``dist_sparse_attn::local_attention`` that every
    sequence-parallel strategy opens around its local attention call and, with
    ``backward``, the backward of the attention's autograd node (in a strategy's step
    the only attention calls are the local ones), plus any ``extra_ranges`` (names of
    the caller's own ``record_function`` ranges). On CUDA: the device time of the
    kernels they launched (the profile needs ``ProfilerActivity.CUDA``); on the CPU:
    their wall time.
    """
    names = {_comm.LOCAL_ATTENTION_RANGE, *extra_ranges}
    if backward:
        names.add(ATTENTION_BACKWARD)
    us = 0.0
    for e in prof.events():
        if e.name in names and e.device_type.name == "CPU":
            us += e.device_time_total if cuda else e.cpu_time_total
    return us / 1e3


def bucket_costs(q_buckets: torch.Tensor, k_buckets: torch.Tensor, P: int,
                 group=None) -> List[float]:
    """The bucket strategy's cost on each of P ranks for the whole sequence's buckets
    q_buckets (B, N, H), k_buckets (B, N, Hkv): the sum over the groups a rank owns of
    n_q * n_k (what its assignment balances), with the strategy's own group numbering
    and owners (:mod:`~dist_sparse_attn.parallel.routing`). Collective over ``group``
    (every rank calls it with the same buckets) only when the groups are too many for
    a dense table."""
    max_bucket = int(max(q_buckets.max(), k_buckets.max()))
    if max_bucket < 0:
        return [0.0] * P
    items = routing.item_groups(q_buckets, k_buckets, 0, max_bucket, group)
    G = items.n_groups
    n_q = torch.bincount(items.gid_q, minlength=G + 1)[:G].cpu()
    n_k = torch.bincount(items.gid_k, minlength=G + 1)[:G].cpu()
    owner = routing.lpt_owners(n_q, n_k, P)
    mine = owner >= 0
    cost = torch.zeros(P, dtype=torch.float64).index_add_(
        0, owner[mine], (n_q[mine] * n_k[mine]).double())
    return cost.tolist()
