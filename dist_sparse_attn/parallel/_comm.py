"""Collectives shared by the sequence-parallel strategies.

Only ``all_to_all_single`` (uneven and zero splits work on gloo and NCCL) and
``all_gather`` of equal-sized tensors are used: gloo cannot gather unequal
sizes. Every differentiable exchange goes through :class:`_AllToAllSingle`,
whose backward is the same exchange in the opposite direction.

Everything that travels in one direction goes through ONE autograd node: one
flat buffer (:func:`all_to_all`), or several tensors exchanged one after the
other inside one node (:func:`all_to_all_many`, no packing copy), so the
forward and the backward issue their collectives in the same order on every
rank (several independent nodes in a backward could be run in a different order
on different ranks by the autograd engine and deadlock).
"""
from __future__ import annotations

import numbers
from typing import List, NamedTuple, Sequence

import torch
import torch.distributed as dist

from .. import _validation as V
# the agreement primitives live a layer down (balance uses them too); the strategies and
# integrations reach them through this module
from .._collective import all_gather_equal, check_same, float_bits, gather_rows  # noqa: F401

# the profiler range around every strategy's local attention (forward): torch.profiler
# separates the local compute from the exchanges by it
LOCAL_ATTENTION_RANGE = "dist_sparse_attn::local_attention"


def local_attention_range():
    """Context manager: the :data:`LOCAL_ATTENTION_RANGE` profiler range (a
    ``torch.profiler.record_function``; microseconds of host time when no profiler runs)."""
    return torch.profiler.record_function(LOCAL_ATTENTION_RANGE)


class _AllToAllSingle(torch.autograd.Function):
    """out = all_to_all_single(inp) along dim 0; backward sends the gradient back."""

    @staticmethod
    def forward(ctx, inp, send_splits: List[int], recv_splits: List[int], group):
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        out = inp.new_empty((sum(recv_splits),) + tuple(inp.shape[1:]))
        dist.all_to_all_single(out, inp.contiguous(), output_split_sizes=recv_splits,
                               input_split_sizes=send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_in = grad_out.new_empty((sum(ctx.send_splits),) + tuple(grad_out.shape[1:]))
        dist.all_to_all_single(grad_in, grad_out.contiguous(),
                               output_split_sizes=ctx.send_splits,
                               input_split_sizes=ctx.recv_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(inp: torch.Tensor, send_splits: Sequence[int], recv_splits: Sequence[int],
               group) -> torch.Tensor:
    """Differentiable ``all_to_all_single`` along dim 0 with (uneven) split sizes."""
    send_splits, recv_splits = [int(s) for s in send_splits], [int(s) for s in recv_splits]
    if inp.requires_grad:
        return _AllToAllSingle.apply(inp, send_splits, recv_splits, group)
    out = inp.new_empty((sum(recv_splits),) + tuple(inp.shape[1:]))
    dist.all_to_all_single(out, inp.contiguous(), output_split_sizes=recv_splits,
                           input_split_sizes=send_splits, group=group)
    return out


class PendingAllToAll:
    """An ``all_to_all_single`` in flight (:func:`all_to_all_start`). ``wait()`` returns
    the received buffer.

    Until ``wait()`` the object holds both buffers: neither may be freed or reused
    while the collective runs (on NCCL it runs on the process group's own stream; a
    buffer freed early could be handed by the caching allocator to a kernel of the
    current stream while NCCL still reads or writes it). ``wait()`` makes the current
    stream wait for the collective (NCCL) or blocks until it is done (gloo), so both
    buffers are safe to drop afterwards."""

    def __init__(self, out: torch.Tensor, inp: torch.Tensor, work):
        self._out, self._inp, self._work = out, inp, work

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
            self._work = None
        self._inp = None
        return self._out


def all_to_all_start(inp: torch.Tensor, send_splits: Sequence[int],
                     recv_splits: Sequence[int], group) -> PendingAllToAll:
    """Start a NON-differentiable ``all_to_all_single`` along dim 0 (``async_op=True``).

    Every rank must start the same collectives in the same order (they are matched by
    their order of issue); several may be in flight at once. Wait for each before using
    its output (:class:`PendingAllToAll`)."""
    send_splits, recv_splits = [int(s) for s in send_splits], [int(s) for s in recv_splits]
    inp = inp.contiguous()
    out = inp.new_empty((sum(recv_splits),) + tuple(inp.shape[1:]))
    work = dist.all_to_all_single(out, inp, output_split_sizes=recv_splits,
                                  input_split_sizes=send_splits, group=group, async_op=True)
    return PendingAllToAll(out, inp, work)


class _AllToAllMany(torch.autograd.Function):
    """Several ``all_to_all_single`` exchanges along dim 0 as ONE autograd node: forward
    and backward issue them in the same fixed order on every rank (separate nodes could
    be run in different orders by different ranks' autograd engines)."""

    @staticmethod
    def forward(ctx, send_splits, recv_splits, group, *inputs):
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        outs = []
        for x, s, r in zip(inputs, send_splits, recv_splits):
            out = x.new_empty((sum(r),) + tuple(x.shape[1:]))
            dist.all_to_all_single(out, x.contiguous(), output_split_sizes=r,
                                   input_split_sizes=s, group=group)
            outs.append(out)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        back = []
        for g, s, r in zip(grads, ctx.send_splits, ctx.recv_splits):
            gi = g.new_empty((sum(s),) + tuple(g.shape[1:]))
            dist.all_to_all_single(gi, g.contiguous(), output_split_sizes=s,
                                   input_split_sizes=r, group=ctx.group)
            back.append(gi)
        return (None, None, None, *back)


def all_to_all_many(tensors: Sequence[torch.Tensor], send_splits, recv_splits,
                    group) -> List[torch.Tensor]:
    """Differentiable ``all_to_all_single`` of each tensor along dim 0 with its own
    (uneven) split sizes, in order: no packing copy into one buffer, and one autograd
    node, so the backward's exchanges keep the same order on every rank."""
    send = [[int(x) for x in s] for s in send_splits]
    recv = [[int(x) for x in r] for r in recv_splits]
    if any(t.requires_grad for t in tensors):
        return list(_AllToAllMany.apply(send, recv, group, *tensors))
    return [all_to_all(t, s, r, group) for t, s, r in zip(tensors, send, recv)]


def exchange_counts(counts: torch.Tensor, group) -> torch.Tensor:
    """counts (P, c) int64, row s = what this rank sends to rank s -> (P, c), row s =
    what rank s sends to this rank."""
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts.contiguous(), group=group)
    return out


# ---------------------------------------------------------------------------------------------
# agreement between ranks
# ---------------------------------------------------------------------------------------------

DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}
DEVICE_CODES = {"cpu": 0, "cuda": 1}
BACKEND_CODES = {"torch": 0, "triton": 1}
MODE_CODES = {"bucketed": 0, "hash": 1, "qk": 2, "dense": 3, "none": 4}
# fixed codes: a strategy function called directly must differ from another one too
STRATEGY_CODES = {"bucket": 0, "ulysses": 1, "allgather": 2}


def check_group(group):
    """``group`` is None (the default group) or a ProcessGroup, and torch.distributed is
    up: raised at once (there is no group to agree over)."""
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise ValueError(f"group must be a torch.distributed ProcessGroup or None, "
                         f"got {type(group).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("sequence-parallel attention needs torch.distributed initialized "
                         "(torch.distributed.init_process_group) on every rank")


def shards_over(group) -> bool:
    """Whether ``group`` shards a sequence: False for None or a group of one rank (a
    ``parallelize`` step then leaves the model as it is), True for a larger process
    group; a ValueError for anything else."""
    if group is None:
        return False
    if not isinstance(group, dist.ProcessGroup):
        raise ValueError(f"group must be None or a torch.distributed ProcessGroup, got "
                         f"{type(group).__name__}")
    return dist.get_world_size(group) > 1


def check_overlap_chunks(overlap_chunks) -> int:
    """The bucket strategy's pipeline chunks: an integer >= 1 (1: one exchange of all
    rows, one kernel call, one exchange back; K > 1: the pipelined path of
    :mod:`.bucket`)."""
    if isinstance(overlap_chunks, bool) or not isinstance(overlap_chunks, numbers.Integral) \
            or overlap_chunks < 1:
        raise ValueError(f"overlap_chunks must be an integer >= 1, got {overlap_chunks!r}")
    return int(overlap_chunks)


class Meta(NamedTuple):
    """What the strategies need from the agreement exchange."""
    lengths: List[int]          # every rank's shard length, in group order
    max_bucket: int             # the largest bucket id on any rank (-1: all dropped)
    overlap_chunks: int         # pipeline chunks of the bucket strategy (1: none)


# the row gathered by validate_and_gather_meta; None = differs legitimately between ranks
_META_NAMES = ("B", "H", "Hkv", "D", "dtype", "device", None, None, "causal", "include_self",
               "strategy", "mode", "n_buckets", "seed", "softmax_scale", "backend",
               "overlap_chunks", "whether the inputs need gradients")


def needs_gradients(q, k, v, strategy: str) -> int:
    """1 when this call's backward runs collectives (for ``strategy``), else 0: with
    gradients enabled, any of q, k, v requiring them ("bucket", "ulysses": q, k and v
    travel through the same exchanges) or k or v requiring them ("allgather": the
    gathered keys' gradients are all-reduced). Every rank must agree, or the backward of
    some ranks waits for collectives the others never run."""
    if not torch.is_grad_enabled():
        return 0
    if strategy == "allgather":
        return int(k.requires_grad or v.requires_grad)
    return int(q.requires_grad or k.requires_grad or v.requires_grad)


def strategy_meta(meta, q, k, v, q_buckets, k_buckets, *, group, strategy, causal,
                  include_self, softmax_scale, backend, overlap_chunks=1) -> Meta:
    """The :class:`Meta` of a strategy call: as the dispatcher gathered it, or gathered
    here when the strategy function is called directly."""
    if meta is not None:
        return meta
    return validate_and_gather_meta(q, k, v, q_buckets, k_buckets, group=group,
                                    strategy=strategy, strategies=(strategy,), causal=causal,
                                    include_self=include_self, softmax_scale=softmax_scale,
                                    backend=backend, overlap_chunks=overlap_chunks)


def validate_and_gather_meta(q, k, v, q_buckets, k_buckets, *, group, strategy, strategies,
                             causal, include_self, softmax_scale, backend, mode="bucketed",
                             n_buckets=None, seed=None, overlap_chunks=1,
                             local_error=None) -> Meta:
    """Validate this rank's inputs and check that all ranks agree, with ONE all_gather.

    Every argument that must be the same on every rank is compared: B, H, Hkv, D, dtype,
    device type, causal, include_self, strategy, mode ("bucketed", "hash", "qk"),
    n_buckets and seed (hash mode), the softmax scale in use, the backend that runs,
    the bucket strategy's overlap chunks (``overlap_chunks``: validated for every
    strategy, compared for "bucket" only, the one that uses it) and whether the backward
    runs collectives (:func:`needs_gradients`). Any difference, or an
    invalid input on any rank, raises a ValueError on every rank (``local_error``: an
    error the caller already met on this rank, e.g. while hashing, raised here after the
    gather in the same way).

    Returns :class:`Meta` (every rank's shard length, the global max bucket, the chunks).
    """
    check_group(group)
    what = "sequence_parallel_attention"
    row = None
    try:
        if local_error is not None:
            raise local_error
        if strategy not in strategies:
            raise ValueError(f"strategy must be one of {tuple(strategies)}, got {strategy!r}")
        V.check_backend(backend)
        V.check_qkv(q, k, v)
        B, n, H, D = q.shape
        if k.shape[1] != n:
            raise ValueError(f"q and k/v shards must have the same length on every rank, got "
                             f"{n} and {k.shape[1]}")
        V.check_buckets("q_buckets", q_buckets, B, n, H, q.device)
        V.check_buckets("k_buckets", k_buckets, B, n, k.shape[2], q.device)
        V.check_scale(softmax_scale)
        V.check_flags(causal=causal, include_self=include_self)
        from ..kernels import resolve
        from ..plan import softmax_scale_for
        ran = resolve(backend, q.device, q.dtype)
        overlap_chunks = check_overlap_chunks(overlap_chunks)
        if strategy != "bucket":        # the only strategy that pipelines
            overlap_chunks = 1
        row = torch.tensor(
            [B, H, k.shape[2], D, DTYPE_CODES[q.dtype], DEVICE_CODES.get(q.device.type, 2), n,
             -1, int(causal), int(include_self), STRATEGY_CODES[strategy],
             MODE_CODES[mode], -1 if n_buckets is None else int(n_buckets),
             -1 if seed is None else int(seed), float_bits(softmax_scale_for(D, softmax_scale)),
             BACKEND_CODES[ran], overlap_chunks, needs_gradients(q, k, v, strategy)],
            dtype=torch.int64)
        if dist.get_backend(group) == "nccl":
            row = row.to(q.device)
        if q_buckets.numel() + k_buckets.numel():
            # the max bucket joins the row on the device: no host sync before the gather
            mb = torch.stack([t.max() for t in (q_buckets, k_buckets) if t.numel()]).max()
            row[7] = mb.to(row.device, torch.int64)
    except Exception as e:      # noqa: BLE001 -- re-raised after the gather, on every rank
        local_error = e
    rows = gather_rows(row, len(_META_NAMES), group, what=what, local_error=local_error)
    check_same(rows, _META_NAMES, what=what, floats=("softmax_scale",))
    return Meta(rows[:, 6].tolist(), int(rows[:, 7].max()), int(rows[0, 16]))
