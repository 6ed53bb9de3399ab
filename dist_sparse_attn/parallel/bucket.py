"""Bucket-routed sequence parallelism (DESIGN §3).

Hash-sparse attention only connects tokens of the same bucket, so every
(batch b, kv head j, bucket) *group* is an independent attention problem.
Groups are assigned to owner ranks by cost (``n_q * n_k / 2``, longest
processing time first), every q item (token, query head) and k item (token,
kv head) travels to its group's owner with its global position and group id,
the owner runs the local kernel on everything it received as one stream
(the group id as the bucket, so attention stays inside each group), and the
outputs travel back. Backward runs the same exchanges in reverse (autograd).

Host synchronisations per forward: two (the group sizes for the assignment, the count
exchange for the split sizes); items are routed by a stable sort on their destination,
without boolean-mask indexing. (The first version had about seven: two ``nonzero``, two
masked selections, the sizes and two ``tolist`` of counts. Measured on 4 H100s before
this change: 10.4 ms of routing/exchange per fwd+bwd at 128k tokens; after: not yet
measured.)

Communication per call, in this order on every rank:
    forward  1 all_reduce (group sizes), 1 all_to_all (item counts),
             1 all_to_all (int64 positions + group ids), 3 all_to_all (q, k, v rows),
             1 all_to_all (outputs back)
    backward 1 all_to_all (output gradients), 3 all_to_all (q, k, v gradients)
(+ 2 all_gathers to number the groups when bucket ids are too sparse for a
dense table, see ``_group_index``.)

Overlap of communication and compute (``chunks`` > 1, see :func:`overlap_chunks`):
every owner splits its groups into ``chunks`` parts of about equal cost (LPT
again, within the owner: every rank computes the same split from the global
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
rank whose cost is one dominant group gets little overlap.
"""
from __future__ import annotations

import heapq
import os
from typing import List

import torch
import torch.distributed as dist

from ..ops import bucketed_attention
from ..plan import softmax_scale_for
from . import _comm

_DENSE_GROUPS_MAX = 2 ** 22     # dense (b, j, bucket) tables up to 4M entries (64 MiB of counts)

# Chunks of the compute/communication pipeline: 1 = one exchange of all rows, one kernel
# call, one exchange back (no overlap); K > 1 = the pipelined path (module docstring).
# 1 until GPU measurements say otherwise: on NCCL the chunks' collectives share one
# stream, each chunk is a smaller kernel launch, and overlap only pays where the exchange
# is a real part of the step. The environment variable DSA_BUCKET_CHUNKS, read on every
# call, overrides it. Every rank of the group must use the same value (checked).
OVERLAP_CHUNKS = 1
CHUNKS_ENV = "DSA_BUCKET_CHUNKS"


def overlap_chunks() -> int:
    """The number of pipeline chunks this call uses: ``$DSA_BUCKET_CHUNKS`` when set,
    else :data:`OVERLAP_CHUNKS`; a ValueError unless it is an integer >= 1."""
    raw = os.environ.get(CHUNKS_ENV, "").strip()
    value = raw if raw else OVERLAP_CHUNKS
    try:
        k = int(value)
    except (TypeError, ValueError):
        k = 0
    if k < 1 or (isinstance(value, float) and value != k):
        src = f"${CHUNKS_ENV}" if raw else "bucket.OVERLAP_CHUNKS"
        raise ValueError(f"{src} must be an integer >= 1, got {value!r}")
    return k


def bucket_parallel_attention(q, k, v, q_buckets, k_buckets, *, group=None, causal=True,
                              include_self=True, softmax_scale=None, backend="auto",
                              _meta=None):
    """Bucket-routed sequence-parallel ``bucketed_attention``.

    Args:
        q: (B, n_r, H, D) this rank's contiguous shard (rank order = sequence order).
        k, v: (B, n_r, Hkv, D); q_buckets (B, n_r, H); k_buckets (B, n_r, Hkv) integer
            (negative: dropped).
        group: process group (None: the default group).
    Returns this rank's shard (B, n_r, H, D) of the single-device result.
    """
    lengths, max_bucket, chunks = _comm.strategy_meta(
        _meta, q, k, v, q_buckets, k_buckets, group=group, strategy="bucket", causal=causal,
        include_self=include_self, softmax_scale=softmax_scale, backend=backend,
        overlap_chunks=overlap_chunks)
    P, rank = dist.get_world_size(group), dist.get_rank(group)
    B, n, H, D = q.shape
    Hkv = k.shape[2]
    g = H // Hkv
    scale = softmax_scale_for(D, softmax_scale)
    if max_bucket < 0:              # every token of every rank dropped: output 0
        return q * 0
    dev = q.device
    offset = sum(lengths[:rank])

    # ---- items and their group keys (b * Hkv + j) * nb + bucket --------------------------
    nb = max_bucket + 1
    t_q = torch.arange(n, device=dev)[None, :, None].expand(B, n, H)          # (B, n, H)
    j_q = (torch.arange(H, device=dev) // g)[None, None, :]                   # (1, 1, H)
    b_q = torch.arange(B, device=dev)[:, None, None]                          # (B, 1, 1)
    qb = q_buckets.long()
    key_q = ((b_q * Hkv + j_q) * nb + qb).reshape(-1)                         # (B*n*H,)
    valid_q = (qb >= 0).reshape(-1)
    pos_q = (t_q + offset).reshape(-1)
    j_k = torch.arange(Hkv, device=dev)[None, None, :]                        # (1, 1, Hkv)
    kb = k_buckets.long()
    key_k = ((b_q * Hkv + j_k) * nb + kb).reshape(-1)                         # (B*n*Hkv,)
    valid_k = (kb >= 0).reshape(-1)
    pos_k = (torch.arange(n, device=dev)[None, :, None].expand(B, n, Hkv) + offset).reshape(-1)

    gid_q, gid_k, n_groups = _group_index(key_q, valid_q, key_k, valid_k, B * Hkv * nb, group)

    # ---- group sizes (local and global) and the owner of every group -------------------
    # One device->host copy for the cost-balanced assignment; the send counts follow on
    # the host from the local sizes, so the only other sync is the count exchange.
    local = torch.stack([torch.bincount(gid_q, minlength=n_groups + 1),
                         torch.bincount(gid_k, minlength=n_groups + 1)])[:, :n_groups]  # (2, G)
    total = local.clone()
    dist.all_reduce(total, group=group)
    total, local = torch.stack([total, local]).cpu().unbind(0)                # (2, G) each
    owner = _lpt_owners(total[0], total[1], P)                                # (G,), -1 unrouted
    if chunks > 1:
        return _pipelined(q, k, v, gid_q, gid_k, pos_q, pos_k, total, local, owner, chunks,
                          group=group, causal=causal, include_self=include_self, scale=scale,
                          backend=backend)
    routed = owner >= 0
    send = torch.zeros(P, 2, dtype=torch.int64).index_add_(
        0, owner[routed], local[:, routed].T)                                 # (P, 2)
    recv = _comm.exchange_counts(send.to(dev), group).cpu()
    sq, sk = send[:, 0].tolist(), send[:, 1].tolist()
    rq, rk = recv[:, 0].tolist(), recv[:, 1].tolist()

    # ---- route the items: stable sort by destination (unrouted and dropped last) -------
    # (item order within a destination stays ascending, as the kernel's stream expects)
    dest_of = torch.cat([torch.where(owner >= 0, owner, P),
                         torch.tensor([P])]).to(dev)                          # (G + 1,)
    idx_q = torch.sort(dest_of[gid_q], stable=True).indices[:sum(sq)]        # (Sq,)
    idx_k = torch.sort(dest_of[gid_k], stable=True).indices[:sum(sk)]        # (Sk,)
    gid_q, gid_k = gid_q[idx_q], gid_k[idx_k]

    # int64 metadata, per destination [pos_q | gid_q | pos_k | gid_k]
    meta_send = _interleave([pos_q[idx_q], gid_q, pos_k[idx_k], gid_k],
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
        o_r = bucketed_attention(qr[None, :, None, :], kr[None, :, None, :],
                                 vr[None, :, None, :], rgid_q[None, :, None],
                                 rgid_k[None, :, None], q_positions=rpos_q[None],
                                 k_positions=rpos_k[None], causal=causal,
                                 include_self=include_self, softmax_scale=scale,
                                 backend=backend)[0, :, 0, :]                 # (Mq, D)
    else:
        # nothing to compute here; keep q, k, v in the graph so that this rank's backward
        # runs the same collectives as the others'
        o_r = qr * 0 + (kr.sum() + vr.sum()) * 0

    # ---- outputs back home, scattered into (B, n, H, D); unrouted items stay 0 ----------
    o_back = _comm.all_to_all(o_r.reshape(-1), [a * D for a in rq], [a * D for a in sq], group)
    out = q.new_zeros(B * n * H, D).index_copy(0, idx_q, o_back.view(-1, D))
    return out.view(B, n, H, D)


# ---------------------------------------------------------------------------------------------
# pipelined path: chunks > 1
# ---------------------------------------------------------------------------------------------

def _chunk_of(owner: torch.Tensor, n_q: torch.Tensor, n_k: torch.Tensor, P: int,
              K: int) -> torch.Tensor:
    """Chunk in [0, K) of every routed group (-1 unrouted): within each owner its groups are
    split by cost n_q * n_k with :func:`_lpt_owners` over K "ranks". Deterministic (the
    same global sizes on every rank)."""
    chunk = torch.full_like(owner, -1)
    live = (owner >= 0).nonzero().flatten()                                   # ascending gid
    if live.numel() == 0:
        return chunk
    by_owner = torch.sort(owner[live], stable=True)                           # gid order kept
    per_owner = torch.bincount(by_owner.values, minlength=P).tolist()         # (P,)
    for gids in torch.split(live[by_owner.indices], per_owner):
        if gids.numel():
            chunk[gids] = _lpt_owners(n_q[gids], n_k[gids], K)
    return chunk


class _Plan:
    """Everything the pipelined exchange needs besides q, k, v (host lists and index
    tensors); per chunk c: idx_q[c], idx_k[c] (this rank's items, in send order), the send
    and receive counts per peer, and the received positions / group ids."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _pipelined(q, k, v, gid_q, gid_k, pos_q, pos_k, total, local, owner, K, *, group,
               causal, include_self, scale, backend):
    """Routing for K chunks and the one metadata exchange; the rows, the attention and
    the outputs go through :class:`_PipelinedAttention`."""
    P = dist.get_world_size(group)
    dev = q.device
    B, n, H, D = q.shape
    chunk = _chunk_of(owner, total[0], total[1], P, K)                        # (G,)
    # slot = chunk * P + owner: sorting by slot puts chunk 0's items first, by destination
    routed = owner >= 0
    slot = torch.where(routed, chunk * P + owner, K * P)                      # (G,)
    send = torch.zeros(K * P, 2, dtype=torch.int64).index_add_(
        0, slot[routed], local[:, routed].T).view(K, P, 2)                    # (K, P, 2)
    # the count exchange wants row s = what goes to rank s: (P, K * 2)
    recv = _comm.exchange_counts(send.transpose(0, 1).reshape(P, 2 * K).to(dev), group)
    recv = recv.cpu().view(P, K, 2).transpose(0, 1)                           # (K, P, 2)
    sq, sk = send[..., 0].tolist(), send[..., 1].tolist()                     # [K][P]
    rq, rk = recv[..., 0].tolist(), recv[..., 1].tolist()

    # ---- route: stable sort by slot (unrouted and dropped last), then cut per chunk ------
    slot_of = torch.cat([slot, torch.tensor([K * P])]).to(dev)               # (G + 1,)
    order_q = torch.sort(slot_of[gid_q], stable=True).indices
    order_k = torch.sort(slot_of[gid_k], stable=True).indices
    idx_q = list(torch.split(order_q[:sum(map(sum, sq))], [sum(s) for s in sq]))  # K x (Sq_c,)
    idx_k = list(torch.split(order_k[:sum(map(sum, sk))], [sum(s) for s in sk]))

    # ---- metadata of every chunk in ONE exchange: per destination [chunk 0 | chunk 1 ...],
    # each chunk's block [pos_q | gid_q | pos_k | gid_k] ---------------------------------
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

    plan = _Plan(K=K, P=P, D=D, group=group, shape_q=(B, n, H, D), shape_k=k.shape,
                 idx_q=idx_q, idx_k=idx_k, sq=sq, sk=sk, rq=rq, rk=rk,
                 rpos_q=rpos_q, rgid_q=rgid_q, rpos_k=rpos_k, rgid_k=rgid_k,
                 kernel_kw=dict(causal=causal, include_self=include_self, softmax_scale=scale,
                                backend=backend),
                 graph=torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)))
    return _PipelinedAttention.apply(q, k, v, plan)


def _local_attention(qr, kr, vr, plan, c, graph):
    """One chunk's attention on the owner: qr (Mq, D), kr, vr (Mk, D) received rows.

    With ``graph``: qr, kr, vr become fresh leaves and the output keeps its own graph
    (returned as (o, leaves)) for the node's backward. Looks ``bucketed_attention`` up in
    this module at call time (benchmarks time it by patching it here)."""
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
            torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        o = bucketed_attention(qr[None, :, None, :], kr[None, :, None, :], vr[None, :, None, :],
                               plan.rgid_q[c][None, :, None], plan.rgid_k[c][None, :, None],
                               q_positions=plan.rpos_q[c][None],
                               k_positions=plan.rpos_k[c][None],
                               **plan.kernel_kw)[0, :, 0, :]                  # (Mq, D)
    return o, leaves


class _PipelinedAttention(torch.autograd.Function):
    """q, k, v shards -> this rank's output shard, through K chunks of (rows out, local
    attention, outputs back) with each chunk's exchanges overlapping a neighbour's compute.

    Forward issues X0, X1, O0, X2, O1, ..., O(K-1) and backward G0, G1, D0, ..., D(K-1)
    (module docstring), the same on every rank, whatever it owns: empty chunks exchange
    zero-size splits and skip the kernel. Not twice differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, plan):
        K, D = plan.K, plan.D
        q2, k2, v2 = q.reshape(-1, D), k.reshape(-1, D), v.reshape(-1, D)

        def rows_out(c):                # Xc: [q rows | k rows | v rows] per destination
            parts, send = _qkv_splits(plan.sq[c], plan.sk[c], D)
            buf = _interleave([q2[plan.idx_q[c]].reshape(-1), k2[plan.idx_k[c]].reshape(-1),
                               v2[plan.idx_k[c]].reshape(-1)], parts)
            return _comm.all_to_all_start(buf, send, _qkv_splits(plan.rq[c], plan.rk[c], D)[1],
                                          plan.group)

        outs, graphs = [None] * K, [None] * K
        pending_x = {0: rows_out(0)}
        for c in range(K):
            if c + 1 < K:
                pending_x[c + 1] = rows_out(c + 1)          # travels while chunk c computes
            rq = plan.rq[c]
            qr, kr, vr = _deinterleave(pending_x.pop(c).wait(),
                                       _qkv_splits(rq, plan.rk[c], D)[0])
            o, leaves = _local_attention(qr.view(-1, D), kr.view(-1, D), vr.view(-1, D),
                                         plan, c, plan.graph)
            if leaves is not None:
                graphs[c] = (o, leaves)
            # Oc: home while chunk c + 1 computes
            outs[c] = _comm.all_to_all_start(o.detach().reshape(-1), [a * D for a in rq],
                                             [a * D for a in plan.sq[c]], plan.group)
        out = q.new_zeros(q2.shape)                                           # (B*n*H, D)
        for c in range(K):              # unrouted items stay 0
            out.index_copy_(0, plan.idx_q[c], outs[c].wait().view(-1, D))
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
        K, D = plan.K, plan.D
        g2 = grad_out.reshape(-1, D)

        def grads_out(c):               # Gc: output grads to the owners
            return _comm.all_to_all_start(g2[plan.idx_q[c]].reshape(-1),
                                          [a * D for a in plan.sq[c]],
                                          [a * D for a in plan.rq[c]], plan.group)

        backs = [None] * K
        pending_g = {0: grads_out(0)}
        for c in range(K):
            if c + 1 < K:
                pending_g[c + 1] = grads_out(c + 1)         # travels while chunk c runs
            rq, rk = plan.rq[c], plan.rk[c]
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
                                              _qkv_splits(plan.sq[c], plan.sk[c], D)[1],
                                              plan.group)
        dq = g2.new_zeros(g2.shape)                                           # (B*n*H, D)
        dk = g2.new_zeros(plan.shape_k[0] * plan.shape_k[1] * plan.shape_k[2], D)
        dv = torch.zeros_like(dk)
        for c in range(K):
            gq, gk, gv = _deinterleave(backs[c].wait(),
                                       _qkv_splits(plan.sq[c], plan.sk[c], D)[0])
            dq.index_copy_(0, plan.idx_q[c], gq.view(-1, D))
            dk.index_copy_(0, plan.idx_k[c], gk.view(-1, D))
            dv.index_copy_(0, plan.idx_k[c], gv.view(-1, D))
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


def _group_index(key_q, valid_q, key_k, valid_k, n_dense: int, group):
    """Number the (b, j, bucket) groups identically on every rank.

    key_q/key_k: every item's dense key (b * Hkv + j) * nb + bucket; valid_*: not dropped.
    Dense keys are used as they are when the table is small; otherwise the distinct
    keys of all ranks are gathered (padded to equal sizes) and numbered in sorted order.
    Returns (gid_q, gid_k, G): per item, its group id in [0, G) or G when dropped.
    """
    if n_dense <= _DENSE_GROUPS_MAX:
        return (torch.where(valid_q, key_q, n_dense), torch.where(valid_k, key_k, n_dense),
                n_dense)
    local = torch.unique(torch.cat([key_q[valid_q], key_k[valid_k]]))          # sorted
    counts = _comm.all_gather_equal(torch.tensor([local.numel()], device=local.device),
                                    group).flatten()
    width = max(int(counts.max()), 1)
    padded = torch.full((width,), -1, dtype=torch.int64, device=local.device)
    padded[:local.numel()] = local
    every = _comm.all_gather_equal(padded, group).flatten()
    keys = torch.unique(every[every >= 0])                                    # (G,) sorted
    G = keys.numel()
    if G >= 2 ** 31 - 1:
        raise ValueError(f"too many (batch, kv head, bucket) groups: {G}")
    gq = torch.searchsorted(keys, key_q).clamp_(max=max(G - 1, 0))
    gk = torch.searchsorted(keys, key_k).clamp_(max=max(G - 1, 0))
    return torch.where(valid_q, gq, G), torch.where(valid_k, gk, G), G


_LPT_EXACT = 64      # groups per rank placed one by one (heap); the rest by water-filling


def _lpt_owners(n_q: torch.Tensor, n_k: torch.Tensor, P: int) -> torch.Tensor:
    """Owner rank of every group, balancing the cost n_q * n_k / 2.

    The ``_LPT_EXACT * P`` costliest groups go by longest-processing-time-first (a
    heap); the remaining, smaller ones fill the ranks' shortfalls below the mean load
    in one vectorised pass (cumulative costs against the ranks' cumulative deficits):
    every rank ends within the largest group's cost of the mean, as with plain LPT, and
    thousands of groups (1M tokens, 2048 buckets, 12 heads: 24576) take ~1 ms instead of
    a Python loop of ~14 ms per call.

    Deterministic (integer costs, ties broken by group id and then by rank; the same
    float64 arithmetic everywhere), so every rank computes the same assignment. Groups
    without queries or without keys are not routed (-1): their outputs are 0.
    """
    owner = torch.full_like(n_q, -1)
    live = ((n_q > 0) & (n_k > 0)).nonzero().flatten()
    if live.numel() == 0:
        return owner
    cost = n_q[live] * n_k[live]                                              # 2 * the cost
    # descending cost, ascending group id for ties (stable sort of ids ascending)
    order = torch.sort(cost, descending=True, stable=True).indices
    gids, cost = live[order], cost[order]
    K = min(len(cost), _LPT_EXACT * P)
    loads = [(0, r) for r in range(P)]                                       # (load, rank) heap
    assign: List[int] = []
    for c in cost[:K].tolist():
        load, r = heapq.heappop(loads)
        assign.append(r)
        heapq.heappush(loads, (load + c, r))
    ranks = torch.tensor(assign, dtype=owner.dtype)
    if K < len(cost):
        rest = cost[K:].double()
        load = torch.zeros(P, dtype=torch.float64)
        for ld, r in loads:
            load[r] = float(ld)
        deficit = (cost.double().sum() / P - load).clamp_(min=0)              # (P,)
        # scale the deficits to the remaining cost, lay them end to end, and give each
        # group to the rank whose stretch holds the group's midpoint
        bounds = torch.cumsum(deficit * (rest.sum() / deficit.sum()), 0)      # (P,)
        mid = torch.cumsum(rest, 0) - rest / 2
        rest_ranks = torch.searchsorted(bounds, mid, right=True).clamp_(max=P - 1)
        ranks = torch.cat([ranks, rest_ranks.to(owner.dtype)])
    owner[gids] = ranks
    return owner


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
