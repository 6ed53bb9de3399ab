"""Bucket-routed sequence parallelism: the exchange (see docs/design.md, section 3).

Hash-sparse attention only connects tokens of the same bucket, so every
(batch b, kv head j, bucket) *group* is an independent attention problem.
:mod:`.routing` assigns the groups to owner ranks by cost and plans which items
travel where; here every q item (token, query head) and k item (token, kv head)
travels to its group's owner with its global position and group id, the owner
runs the local kernel on everything it received as one stream (the group id as
the bucket, so attention stays inside each group), and the outputs travel back.
Backward runs the same exchanges in reverse (autograd).

Host synchronisations per forward: two (the group sizes for the assignment, the count
exchange for the split sizes); items are routed by a stable sort on their destination,
without boolean-mask indexing.

Communication per call, in this order on every rank:
    forward  1 all_reduce (group sizes), 1 all_to_all (item counts),
             1 all_to_all (int64 positions + group ids), 3 all_to_all (q, k, v rows),
             1 all_to_all (outputs back)
    backward 1 all_to_all (output gradients), 3 all_to_all (q, k, v gradients)
(+ 2 all_gathers to number the groups when bucket ids are too sparse for a
dense table, see ``routing.group_index``.)

Overlap of communication and compute (``overlap_chunks`` K > 1): every owner
splits its groups into K parts of about equal cost (``routing.chunk_of``: LPT
again, within the owner; every rank computes the same split from the global
sizes) and items travel per (owner, chunk). The metadata of all chunks still
travels in one collective; then the rows of chunk c + 1 travel (``async_op``)
while the owner computes chunk c, and chunk c's outputs travel home while it
computes chunk c + 1. One :class:`_PipelinedAttention` (a single autograd
node) runs forward and backward, so the collectives are issued in one fixed
order on every rank (autograd would be free to reorder independent ones):

    forward  1 all_reduce, 1 all_to_all (counts per (dest, chunk)), 1 all_to_all (metadata),
             then X0, X1, O0, X2, O1, ..., O(K-1)   (Xc: rows of chunk c out, Oc: outputs back)
    backward G0, G1, D0, G2, D1, ..., D(K-1)        (Gc: output grads out, Dc: q/k/v grads back)

all ``all_to_all_single(async_op=True)``, waited for just before their data is
needed; each chunk's local attention runs under its own small autograd graph
(detached rows), whose backward the node's backward runs chunk by chunk.
A group is never split between chunks (its softmax needs all its keys), so a
rank whose cost is one dominant group gets little overlap. The default is one
chunk: on NCCL the chunks' collectives share one stream, each chunk is a smaller
kernel launch, and overlap only pays where the exchange is a real part of the step.

The local attention runs inside the profiler range ``dist_sparse_attn::local_attention``
(``_comm.LOCAL_ATTENTION_RANGE``): ``torch.profiler`` separates the local compute
from the exchange (``benchmarks/bench_parallel.py`` reads it).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..ops import bucketed_attention
from ..plan import softmax_scale_for
from . import _comm, routing


def bucket_parallel_attention(q, k, v, q_buckets, k_buckets, *, group=None, causal=True,
                              include_self=True, softmax_scale=None, backend="auto",
                              overlap_chunks=1, _meta=None):
    """Bucket-routed sequence-parallel ``bucketed_attention``.

    Args:
        q: (B, n_r, H, D) this rank's contiguous shard (rank order = sequence order).
        k, v: (B, n_r, Hkv, D); q_buckets (B, n_r, H); k_buckets (B, n_r, Hkv) integer
            (negative: dropped).
        group: process group (None: the default group).
        overlap_chunks: 1 (default): one exchange of all rows, one kernel call, one
            exchange back; K > 1: the pipelined path, K chunks whose exchanges overlap
            the neighbouring chunk's kernel (module docstring). The same on every rank
            (checked).
    Returns this rank's shard (B, n_r, H, D) of the single-device result.
    """
    lengths, max_bucket, K = _comm.strategy_meta(
        _meta, q, k, v, q_buckets, k_buckets, group=group, strategy="bucket", causal=causal,
        include_self=include_self, softmax_scale=softmax_scale, backend=backend,
        overlap_chunks=overlap_chunks)
    rank = dist.get_rank(group)
    B, n, H, D = q.shape
    scale = softmax_scale_for(D, softmax_scale)
    if max_bucket < 0:              # every token of every rank dropped: output 0
        return q * 0
    items = routing.item_groups(q_buckets, k_buckets, sum(lengths[:rank]), max_bucket, group)
    r = routing.route(items, K, group)
    if K > 1:
        return _pipelined(q, k, v, items, r, group=group, causal=causal,
                          include_self=include_self, scale=scale, backend=backend)
    idx_q, idx_k = r.idx_q[0], r.idx_k[0]
    sq, sk, rq, rk = r.sq[0], r.sk[0], r.rq[0], r.rk[0]
    gid_q, gid_k = items.gid_q[idx_q], items.gid_k[idx_k]

    # int64 metadata, per destination [pos_q | gid_q | pos_k | gid_k]
    meta_send = _interleave([items.pos_q[idx_q], gid_q, items.pos_k[idx_k], gid_k],
                            [sq, sq, sk, sk])
    meta_recv = _comm.all_to_all(meta_send, [2 * a + 2 * b for a, b in zip(sq, sk)],
                                 [2 * a + 2 * b for a, b in zip(rq, rk)], group)
    rpos_q, rgid_q, rpos_k, rgid_k = _deinterleave(meta_recv, [rq, rq, rk, rk])

    # rows: q, k and v each exchanged as they are gathered (three exchanges in one
    # autograd node; no packing into one buffer, which cost a copy each way)
    q_rows = _gather_rows(q.reshape(-1, D), idx_q)                            # (Sq, D)
    k_rows = _gather_rows(k.reshape(-1, D), idx_k)                            # (Sk, D)
    v_rows = _gather_rows(v.reshape(-1, D), idx_k)                            # (Sk, D)
    qr, kr, vr = _comm.all_to_all_many([q_rows, k_rows, v_rows], [sq, sk, sk],
                                       [rq, rk, rk], group)                   # (Mq|Mk, D)
    del q_rows, k_rows, v_rows      # full copies of the shard: free before the kernel

    # ---- the owner's groups as one stream: bucket = group id ---------------------------
    if qr.shape[0] and kr.shape[0]:
        with _comm.local_attention_range():
            o_r = bucketed_attention(qr[None, :, None, :], kr[None, :, None, :],
                                     vr[None, :, None, :], rgid_q[None, :, None],
                                     rgid_k[None, :, None], q_positions=rpos_q[None],
                                     k_positions=rpos_k[None], causal=causal,
                                     include_self=include_self, softmax_scale=scale,
                                     backend=backend)[0, :, 0, :]             # (Mq, D)
    else:
        # nothing to compute here; keep q, k, v in the graph so that this rank's backward
        # runs the same collectives as the others'
        o_r = qr * 0 + (kr.sum() + vr.sum()) * 0

    # ---- outputs back home, scattered into (B, n, H, D); unrouted items stay 0 ----------
    o_back = _comm.all_to_all(o_r.reshape(-1), [a * D for a in rq], [a * D for a in sq], group)
    out = q.new_zeros(B * n * H, D).index_copy(0, idx_q, o_back.view(-1, D))
    return out.view(B, n, H, D)


# ---------------------------------------------------------------------------------------------
# pipelined path: overlap_chunks > 1
# ---------------------------------------------------------------------------------------------

def _pipelined(q, k, v, items: routing.Items, r: routing.Route, *, group, causal,
               include_self, scale, backend):
    """The one metadata exchange of all K chunks; the rows, the attention and the
    outputs go through :class:`_PipelinedAttention`."""
    K, P = r.K, r.P
    idx_q, idx_k, sq, sk, rq, rk = r.idx_q, r.idx_k, r.sq, r.sk, r.rq, r.rk
    pos_q, gid_q, pos_k, gid_k = items.pos_q, items.gid_q, items.pos_k, items.gid_k
    # metadata of every chunk in ONE exchange: per destination [chunk 0 | chunk 1 ...],
    # each chunk's block [pos_q | gid_q | pos_k | gid_k]
    m_send = [[2 * a + 2 * b for a, b in zip(sq[c], sk[c])] for c in range(K)]   # [K][P]
    m_recv = [[2 * a + 2 * b for a, b in zip(rq[c], rk[c])] for c in range(K)]
    blocks = [_interleave([pos_q[idx_q[c]], gid_q[idx_q[c]], pos_k[idx_k[c]], gid_k[idx_k[c]]],
                          [sq[c], sq[c], sk[c], sk[c]]) for c in range(K)]
    meta_recv = _comm.all_to_all(_interleave(blocks, m_send),
                                 [sum(m[d] for m in m_send) for d in range(P)],
                                 [sum(m[s] for m in m_recv) for s in range(P)], group)
    rpos_q, rgid_q, rpos_k, rgid_k = [], [], [], []
    for c, blk in enumerate(_deinterleave(meta_recv, m_recv)):
        a, b, c2, d = _deinterleave(blk, [rq[c], rq[c], rk[c], rk[c]])
        rpos_q.append(a), rgid_q.append(b), rpos_k.append(c2), rgid_k.append(d)

    plan = routing.BucketPlan(
        route=r, group=group, shape_q=tuple(q.shape), shape_k=tuple(k.shape),
        rpos_q=rpos_q, rgid_q=rgid_q, rpos_k=rpos_k, rgid_k=rgid_k, causal=causal,
        include_self=include_self, scale=scale, backend=backend,
        graph=torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)))
    return _PipelinedAttention.apply(q, k, v, plan)


def _local_attention(qr, kr, vr, plan: routing.BucketPlan, c, graph):
    """One chunk's attention on the owner: qr (Mq, D), kr, vr (Mk, D) received rows.

    With ``graph``: qr, kr, vr become fresh leaves and the output keeps its own graph
    (returned as (o, leaves)) for the node's backward."""
    leaves = None
    if not (qr.shape[0] and kr.shape[0]):               # nothing to compute in this chunk
        return qr.new_zeros(qr.shape), None
    if graph:
        leaves = [x.detach().requires_grad_() for x in (qr, kr, vr)]
        qr, kr, vr = leaves
    # identity saved-tensor hooks: the chunk's own graph must not go through an outer
    # non-reentrant checkpoint's hooks (its backward runs torch.autograd.grad, a new graph
    # task, which would recompute the whole checkpointed block -- collectives included --
    # once per chunk, and skip it for empty chunks: ranks out of step, a hang)
    with torch.set_grad_enabled(graph), \
            torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t), \
            _comm.local_attention_range():
        o = bucketed_attention(qr[None, :, None, :], kr[None, :, None, :], vr[None, :, None, :],
                               plan.rgid_q[c][None, :, None], plan.rgid_k[c][None, :, None],
                               q_positions=plan.rpos_q[c][None],
                               k_positions=plan.rpos_k[c][None], causal=plan.causal,
                               include_self=plan.include_self, softmax_scale=plan.scale,
                               backend=plan.backend)[0, :, 0, :]             # (Mq, D)
    return o, leaves


class _PipelinedAttention(torch.autograd.Function):
    """q, k, v shards -> this rank's output shard, through K chunks of (rows out, local
    attention, outputs back) with each chunk's exchanges overlapping a neighbour's compute.

    Forward issues X0, X1, O0, X2, O1, ..., O(K-1) and backward G0, G1, D0, ..., D(K-1)
    (module docstring), the same on every rank, whatever it owns: empty chunks exchange
    zero-size splits and skip the kernel. Not twice differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, plan: routing.BucketPlan):
        r, K, D = plan.route, plan.K, plan.D
        q2, k2, v2 = q.reshape(-1, D), k.reshape(-1, D), v.reshape(-1, D)

        def rows_out(c):                # Xc: [q rows | k rows | v rows] per destination
            parts, send = _qkv_splits(r.sq[c], r.sk[c], D)
            buf = _interleave([q2[r.idx_q[c]].reshape(-1), k2[r.idx_k[c]].reshape(-1),
                               v2[r.idx_k[c]].reshape(-1)], parts)
            return _comm.all_to_all_start(buf, send, _qkv_splits(r.rq[c], r.rk[c], D)[1],
                                          plan.group)

        outs, graphs = [None] * K, [None] * K
        pending_x = {0: rows_out(0)}
        for c in range(K):
            if c + 1 < K:
                pending_x[c + 1] = rows_out(c + 1)          # travels while chunk c computes
            rq = r.rq[c]
            qr, kr, vr = _deinterleave(pending_x.pop(c).wait(),
                                       _qkv_splits(rq, r.rk[c], D)[0])
            o, leaves = _local_attention(qr.view(-1, D), kr.view(-1, D), vr.view(-1, D),
                                         plan, c, plan.graph)
            if leaves is not None:
                graphs[c] = (o, leaves)
            # Oc: home while chunk c + 1 computes
            outs[c] = _comm.all_to_all_start(o.detach().reshape(-1), [a * D for a in rq],
                                             [a * D for a in r.sq[c]], plan.group)
        out = q.new_zeros(q2.shape)                                           # (B*n*H, D)
        for c in range(K):              # unrouted items stay 0
            out.index_copy_(0, r.idx_q[c], outs[c].wait().view(-1, D))
        ctx.plan, ctx.graphs = plan, graphs
        return out.view(plan.shape_q)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        plan, graphs = ctx.plan, ctx.graphs
        if graphs is None:
            raise RuntimeError("bucket strategy (pipelined): backward through the same call "
                               "twice is not supported (its graph is freed after the first)")
        ctx.graphs = None
        r, K, D = plan.route, plan.K, plan.D
        g2 = grad_out.reshape(-1, D)

        def grads_out(c):               # Gc: output grads to the owners
            return _comm.all_to_all_start(g2[r.idx_q[c]].reshape(-1),
                                          [a * D for a in r.sq[c]],
                                          [a * D for a in r.rq[c]], plan.group)

        backs = [None] * K
        pending_g = {0: grads_out(0)}
        for c in range(K):
            if c + 1 < K:
                pending_g[c + 1] = grads_out(c + 1)         # travels while chunk c runs
            rq, rk = r.rq[c], r.rk[c]
            g = pending_g.pop(c).wait().view(-1, D)                           # (Mq, D)
            if graphs[c] is None:       # empty chunk: zero gradients of the right sizes
                dq = g.new_zeros(sum(rq), D)
                dk = g.new_zeros(sum(rk), D)
                dv = g.new_zeros(sum(rk), D)
            else:
                o, leaves = graphs[c]
                graphs[c] = None        # free this chunk's graph as it goes
                with torch.enable_grad():
                    dq, dk, dv = torch.autograd.grad(o, leaves, g, allow_unused=True)
                dq, dk, dv = (torch.zeros_like(x) if d is None else d
                              for x, d in zip(leaves, (dq, dk, dv)))
            # Dc: [dq | dk | dv] home while chunk c + 1 runs
            parts, send = _qkv_splits(rq, rk, D)
            buf = _interleave([dq.reshape(-1), dk.reshape(-1), dv.reshape(-1)], parts)
            backs[c] = _comm.all_to_all_start(buf, send,
                                              _qkv_splits(r.sq[c], r.sk[c], D)[1],
                                              plan.group)
        dq = g2.new_zeros(g2.shape)                                           # (B*n*H, D)
        dk = g2.new_zeros(plan.shape_k[0] * plan.shape_k[1] * plan.shape_k[2], D)
        dv = torch.zeros_like(dk)
        for c in range(K):
            gq, gk, gv = _deinterleave(backs[c].wait(),
                                       _qkv_splits(r.sq[c], r.sk[c], D)[0])
            dq.index_copy_(0, r.idx_q[c], gq.view(-1, D))
            dk.index_copy_(0, r.idx_k[c], gk.view(-1, D))
            dv.index_copy_(0, r.idx_k[c], gv.view(-1, D))
        return (dq.view(plan.shape_q), dk.view(plan.shape_k), dv.view(plan.shape_k), None)


def _qkv_splits(n_q, n_k, D):
    """A [q rows | k rows | v rows] buffer per peer, from the peers' q and k row counts:
    the element splits of its three parts (for :func:`_interleave` /
    :func:`_deinterleave`) and each peer's total (the exchange's split sizes)."""
    parts = [[a * D for a in n_q], [b * D for b in n_k], [b * D for b in n_k]]
    return parts, [(a + 2 * b) * D for a, b in zip(n_q, n_k)]


class _GatherRows(torch.autograd.Function):
    """rows = x[idx] for idx WITHOUT repeats; backward scatters with ``index_copy``.

    Advanced indexing's backward is an accumulating ``index_put_``, which sorts the
    indices on CUDA (0.4 ms at 128k tokens on 4 H100s, measured); distinct indices need
    no accumulation."""

    @staticmethod
    def forward(ctx, x, idx):
        ctx.save_for_backward(idx)
        ctx.n = x.shape[0]
        return x.index_select(0, idx)

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        out = grad.new_zeros((ctx.n,) + tuple(grad.shape[1:]))
        return out.index_copy_(0, idx, grad), None


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[idx] along dim 0 for distinct indices (differentiable, cheap backward)."""
    return _GatherRows.apply(x, idx) if x.requires_grad else x.index_select(0, idx)


def _interleave(parts, splits):
    """Concatenate per destination: [parts[0][dest 0], parts[1][dest 0], ...,
    parts[0][dest 1], ...].

    parts: 1-D tensors, splits[i] the per-destination sizes of parts[i]."""
    chunks = [torch.split(p, s) for p, s in zip(parts, splits)]
    return torch.cat([c[d] for d in range(len(splits[0])) for c in chunks])


def _deinterleave(buf, splits):
    """Inverse of :func:`_interleave`: the list of parts."""
    P = len(splits[0])
    sizes = [splits[i][d] for d in range(P) for i in range(len(splits))]
    pieces = torch.split(buf, sizes)
    m = len(splits)
    return [torch.cat([pieces[d * m + i] for d in range(P)]) for i in range(m)]
