"""All-gather of the kept keys: sequence parallelism for QK-sparse attention.

Every rank keeps its queries and gathers the *compacted* kept k/v items of all
ranks: an item is one (token, kv head) whose key bucket is non-negative, sent
as one row ``[k | v]`` with its global position and its (batch, kv head,
bucket) key. The exchange therefore shrinks with the drop rate (nothing of a
dropped key travels). Each rank then runs the local kernel on one stream: its
kept query items (token, query head) against all gathered key items, the
(batch, kv head, bucket) group as the bucket and global positions for
causality. Any bucket ids work (QK-sparse uses 0 = kept, -1 = dropped); with
every bucket 0 this is all-gather KV context parallelism for dense attention.

gloo cannot all_gather unequal sizes, so every rank pads its items to the
largest count (learned first with one tiny all_gather). The k/v gradients
travel back to their home ranks in the backward of :class:`_GatherRows`: one
all_reduce of the gathered gradient, then this rank's slice (exact: every rank
used every rank's rows, so the summed gradient of this rank's slice is its gradient).

Communication per call, in this order on every rank:
    forward  1 all_gather (kept-key counts), 1 all_gather (int64 positions + group keys),
             1 all_gather (k, v rows)
    backward 1 all_reduce (k, v row gradients; skipped when k and v need no gradient)
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..ops import bucketed_attention
from ..plan import softmax_scale_for
from . import _comm

_BUCKET_BITS = 31               # bucket ids are < 2**31 - 1 (validated)


class _GatherRows(torch.autograd.Function):
    """(M, C) equal-shaped rows of every rank -> (P * M, C) in rank order.

    Backward: the gradient of the gathered rows summed over ranks (all_reduce),
    then this rank's slice: every rank's rows were used by every rank."""

    @staticmethod
    def forward(ctx, rows, group):
        ctx.group = group
        ctx.rank, ctx.m = dist.get_rank(group), rows.shape[0]
        return _comm.all_gather_equal(rows, group).flatten(0, 1)                # (P*M, C)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.m:(ctx.rank + 1) * ctx.m], None


def allgather_attention(q, k, v, q_buckets, k_buckets, *, group=None, causal=True,
                        include_self=True, softmax_scale=None, backend="auto", _meta=None):
    """Sequence-parallel ``bucketed_attention`` by all-gathering the kept keys.

    Args:
        q: (B, n_r, H, D) this rank's contiguous shard (rank order = sequence order).
        k, v: (B, n_r, Hkv, D); q_buckets (B, n_r, H); k_buckets (B, n_r, Hkv) integer
            (negative: dropped; for QK-sparse 0 = kept, -1 = dropped).
        group: process group (None: the default group).
    Returns this rank's shard (B, n_r, H, D) of the single-device result.

    Memory: every rank holds all kept key items of the sequence, so this suits
    QK-sparse attention with a high drop rate; use "bucket" for hash-sparse.
    """
    lengths, max_bucket, _ = _comm.strategy_meta(
        _meta, q, k, v, q_buckets, k_buckets, group=group, strategy="allgather", causal=causal,
        include_self=include_self, softmax_scale=softmax_scale, backend=backend)
    rank = dist.get_rank(group)
    B, n, H, D = q.shape
    Hkv = k.shape[2]
    g = H // Hkv
    scale = softmax_scale_for(D, softmax_scale)
    if max_bucket < 0:              # every token of every rank dropped: output 0
        return q * 0
    dev = q.device
    offset = sum(lengths[:rank])

    # ---- kept key items: (token, kv head) with bucket >= 0 -------------------------------
    kb = k_buckets.long()                                                     # (B, n, Hkv)
    idx_k = (kb >= 0).reshape(-1).nonzero().flatten()                         # (c,)
    b_k = idx_k // (n * Hkv)
    t_k = (idx_k // Hkv) % n
    j_k = idx_k % Hkv
    # group key (b * Hkv + j) << 31 | bucket: exact in int64 for B * Hkv < 2**32
    key_k = ((b_k * Hkv + j_k) << _BUCKET_BITS) + kb.reshape(-1)[idx_k]      # (c,)
    pos_k = t_k + offset

    # ---- how many items each rank sends: pad to the largest count ----------------------
    c = idx_k.numel()
    counts = _comm.all_gather_equal(torch.tensor([c], device=dev), group).flatten().tolist()
    m = max(counts)
    if m == 0:                      # no key kept anywhere: every output row is empty
        return q * 0
    meta = torch.full((m, 2), -1, dtype=torch.int64, device=dev)
    meta[:c, 0], meta[:c, 1] = pos_k, key_k
    meta_all = _comm.all_gather_equal(meta, group)                            # (P, m, 2)
    rows = torch.cat([k.reshape(-1, D)[idx_k], v.reshape(-1, D)[idx_k]], 1)   # (c, 2D)
    rows = torch.cat([rows, rows.new_zeros(m - c, 2 * D)])                    # (m, 2D)
    if rows.requires_grad:
        rows_all = _GatherRows.apply(rows, group)                             # (P*m, 2D)
    else:
        rows_all = _comm.all_gather_equal(rows, group).flatten(0, 1)

    # drop the padding: rank s's first counts[s] rows are real
    real = torch.cat([torch.arange(s * m, s * m + cs, device=dev)
                      for s, cs in enumerate(counts)])                        # (Mk,)
    kr, vr = rows_all[real].split(D, dim=1)                                   # (Mk, D) each
    meta_all = meta_all.flatten(0, 1)[real]                                   # (Mk, 2)
    rpos_k, rkey_k = meta_all[:, 0], meta_all[:, 1]

    # ---- this rank's kept query items: (token, query head) ------------------------------
    qb = q_buckets.long()                                                     # (B, n, H)
    idx_q = (qb >= 0).reshape(-1).nonzero().flatten()                         # (Mq,)
    b_q = idx_q // (n * H)
    t_q = (idx_q // H) % n
    j_q = (idx_q % H) // g
    key_q = ((b_q * Hkv + j_q) << _BUCKET_BITS) + qb.reshape(-1)[idx_q]
    pos_q = t_q + offset

    # groups renumbered locally (all the keys are here): small ids for the kernel
    _, gid = torch.unique(torch.cat([key_q, rkey_k]), return_inverse=True)
    gid_q, gid_k = gid[:idx_q.numel()], gid[idx_q.numel():]

    if idx_q.numel():
        with _comm.local_attention_range():
            o_r = bucketed_attention(q.reshape(-1, D)[idx_q][None, :, None, :],
                                     kr[None, :, None, :], vr[None, :, None, :],
                                     gid_q[None, :, None], gid_k[None, :, None],
                                     q_positions=pos_q[None], k_positions=rpos_k[None],
                                     causal=causal, include_self=include_self,
                                     softmax_scale=scale,
                                     backend=backend)[0, :, 0, :]             # (Mq, D)
    else:
        o_r = q.new_zeros(0, D)
    out = q.new_zeros(B * n * H, D).index_copy(0, idx_q, o_r).view(B, n, H, D)
    # keep q and the gathered rows in the graph, so that every rank's backward runs the
    # gather's all_reduce, also a rank without kept queries
    # (sums of empty slices: exact zeros, whatever the values)
    return out + (q.reshape(-1)[:0].sum() + rows_all[:0].sum()).to(q.dtype)
