"""Process groups for DeepSpeed training with sequence parallelism: an ``mpu`` object.

Why not DeepSpeed's own mesh (``"sequence_parallel_size"`` and ``"data_parallel_size"`` in the
DeepSpeed config)? In DeepSpeed 0.19.8 that mesh reduces gradients over the pure
data-parallel group only (``groups._get_sequence_data_parallel_group`` falls back to the
mesh's data-parallel dimension), so sequence-parallel ranks keep their own partial
gradients and their weights drift apart silently; with ``dp = 1`` no gradient is
reduced at all. Measured here: after one step the ranks' gradients differed from
single-process training by 50 %. DeepSpeed-Ulysses users pass an ``mpu`` (as
Megatron-DeepSpeed does); this module builds one, whose
``get_sequence_data_parallel_group`` is the whole grid, so DeepSpeed sums gradients
over data- and sequence-parallel ranks and divides by the data-parallel size.

Layout of ``world = dp * sp`` ranks: sequence-parallel groups are blocks of ``sp``
consecutive ranks (one node's GPUs first, so the all-to-alls stay on NVLink);
data-parallel groups are the ranks with the same index within their block.
"""
from __future__ import annotations

import datetime
import numbers

import torch.distributed as dist


def default_group_timeout() -> datetime.timedelta | None:
    """The collective timeout of the default process group: what was passed to
    ``init_process_group`` / ``deepspeed.init_distributed(timeout=...)``. torch gives a
    new group its own backend default (30 min for gloo, 10 for NCCL) instead of
    inheriting it; this reads it from the group's backend options (not a public torch
    API: None where a torch version does not expose it)."""
    try:
        pg = dist.distributed_c10d._get_default_group()
        devices = list(pg._device_types)
    except (AttributeError, RuntimeError, ValueError):
        return None
    for device in devices:
        try:
            timeout = pg._get_backend(device).options._timeout
        except (AttributeError, RuntimeError, ValueError):
            continue
        if isinstance(timeout, datetime.timedelta):
            return timeout
    return None


class SequenceParallelMPU:
    """``mpu`` for ``deepspeed.initialize(..., mpu=SequenceParallelMPU(sp))``.

    Every rank of the default group must construct it, in the same order (it creates
    process groups). Model/tensor parallelism is 1.

    Args:
        sequence_parallel_size: ranks per sequence-parallel group; must divide the world size.
        timeout: ``datetime.timedelta``, the collective timeout of every group created
            here (a rank that dies or stalls makes the others fail after it). None: the
            default group's own timeout (:func:`default_group_timeout`), so the groups
            fail as fast as the world group; torch's backend default only where that
            cannot be read.
    """

    def __init__(self, sequence_parallel_size: int, timeout: datetime.timedelta | None = None):
        world, rank = dist.get_world_size(), dist.get_rank()
        if isinstance(sequence_parallel_size, bool) or not isinstance(sequence_parallel_size, numbers.Integral) \
                or sequence_parallel_size < 1 or world % sequence_parallel_size:
            raise ValueError(f"sequence_parallel_size={sequence_parallel_size!r} must be an int "
                             f">= 1 that divides the world size {world}")
        if timeout is None:
            timeout = default_group_timeout()
        if timeout is not None and (not isinstance(timeout, datetime.timedelta)
                                    or timeout <= datetime.timedelta(0)):
            raise ValueError(f"timeout must be a positive datetime.timedelta or None, "
                             f"got {timeout!r}")
        sp = int(sequence_parallel_size)
        self.sp, self.dp, self.rank = sp, world // sp, rank
        self.timeout = timeout
        kw = {} if timeout is None else {"timeout": timeout}
        self._sp_group = self._dp_group = self._mp_group = None
        for d in range(self.dp):                                   # consecutive blocks
            ranks = list(range(d * sp, (d + 1) * sp))
            g = dist.new_group(ranks, **kw)
            if rank in ranks:
                self._sp_group, self._sp_ranks = g, ranks
        for s in range(sp):                                        # strided
            ranks = list(range(s, world, sp))
            g = dist.new_group(ranks, **kw)
            if rank in ranks:
                self._dp_group, self._dp_ranks = g, ranks
        for r in range(world):                                     # model parallel: size 1
            g = dist.new_group([r], **kw)
            if r == rank:
                self._mp_group = g
        self._world_group = dist.group.WORLD

    # sequence parallel
    def get_sequence_parallel_group(self):
        return self._sp_group

    def get_sequence_parallel_world_size(self):
        return self.sp

    def get_sequence_parallel_rank(self):
        return self.rank % self.sp

    # gradients are reduced (and ZeRO partitions) over data x sequence parallel = the world
    def get_sequence_data_parallel_group(self):
        return self._world_group

    def get_sequence_data_parallel_world_size(self):
        return self.sp * self.dp

    def get_sequence_data_parallel_rank(self):
        return self.rank

    # data parallel. DeepSpeed uses this group for what is replicated: ZeRO-3 partitions
    # (and reduces) parameters over it, so it is the whole grid (with the data-parallel
    # group proper, ZeRO-3 would reduce no gradient across sequence-parallel ranks);
    # its SIZE stays dp, which DeepSpeed uses for the batch-size arithmetic.
    def get_data_parallel_group(self):
        return self._world_group

    def get_pure_data_parallel_group(self):
        """The ranks that hold the same sequence shard of different sequences (size dp)."""
        return self._dp_group

    def get_data_parallel_world_size(self):
        return self.dp

    def get_data_parallel_rank(self):
        return self.rank // self.sp

    def get_data_parallel_group_ranks(self):
        return list(self._dp_ranks)

    # model / tensor parallel: none
    def get_model_parallel_group(self):
        return self._mp_group

    def get_model_parallel_world_size(self):
        return 1

    def get_model_parallel_rank(self):
        return 0

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank

    def get_tensor_model_parallel_src_rank(self):
        return self.rank


__all__ = ["SequenceParallelMPU", "default_group_timeout"]
