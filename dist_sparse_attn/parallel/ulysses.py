"""Ulysses sequence parallelism: heads all-to-all, full sequence per rank.

Rank r holds the contiguous shard (B, n_r, H, D) of every head. One
all-to-all gives every rank the whole sequence for H/P query heads (and
Hkv/P kv heads), the local kernel runs with global positions, and the reverse
all-to-all returns the shards. Shard lengths may differ between ranks: the
exchanges are ``all_to_all_single`` with uneven split sizes.

Communication per call, in this order on every rank:
    forward  1 all_to_all (int64 buckets), 1 all_to_all (q, k, v), 1 all_to_all (o)
    backward 1 all_to_all (output gradients), 1 all_to_all (q, k, v gradients)
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..ops import bucketed_attention
from ..plan import softmax_scale_for
from . import _comm


def ulysses_attention(q, k, v, q_buckets, k_buckets, *, group=None, causal=True,
                      include_self=True, softmax_scale=None, backend="auto", _meta=None):
    """Ulysses sequence-parallel ``bucketed_attention``.

    Args:
        q: (B, n_r, H, D) this rank's contiguous shard (rank order = sequence order).
        k, v: (B, n_r, Hkv, D); q_buckets (B, n_r, H); k_buckets (B, n_r, Hkv) integer.
        group: process group (None: the default group). Its size P must divide H and Hkv.
    Returns this rank's shard (B, n_r, H, D) of the single-device result.
    """
    lengths, _, _ = _comm.strategy_meta(
        _meta, q, k, v, q_buckets, k_buckets, group=group, strategy="ulysses", causal=causal,
        include_self=include_self, softmax_scale=softmax_scale, backend=backend)
    P = dist.get_world_size(group)
    B, n, H, D = q.shape
    Hkv = k.shape[2]
    if H % P or Hkv % P:    # H and Hkv agree on every rank: every rank raises
        raise ValueError(f"strategy='ulysses' needs the group size ({P}) to divide the "
                         f"query heads ({H}) and the kv heads ({Hkv}); use strategy='bucket'")
    Hp, Hkvp = H // P, Hkv // P
    scale = softmax_scale_for(D, softmax_scale)

    def to_heads(x, hp):
        """(B, n, P*hp, ...) -> (P, B, n, hp, ...) flat: the chunk for rank s is head slice s."""
        x = x.reshape(B, n, P, hp, *x.shape[3:]).movedim(2, 0)               # (P, B, n, hp, ...)
        return x.reshape(-1)

    def from_seq(flat, hp, tail):
        """Received flat chunks (one per source s, (B, n_s, hp, *tail)) -> (B, N, hp, *tail)."""
        per = B * hp * (tail[0] if tail else 1)
        parts = torch.split(flat, [m * per for m in lengths])
        return torch.cat([p.view(B, m, hp, *tail) for p, m in zip(parts, lengths)], 1)

    # ---- buckets: (B, n, H) -> (B, N, Hp), (B, n, Hkv) -> (B, N, Hkvp) ---------------------
    qb_s, kb_s = q_buckets.long(), k_buckets.long()
    send_i = [B * n * (Hp + Hkvp)] * P
    recv_i = [B * m * (Hp + Hkvp) for m in lengths]
    ib = torch.cat([to_heads(qb_s, Hp).view(P, -1), to_heads(kb_s, Hkvp).view(P, -1)], 1)
    ib = _comm.all_to_all(ib.reshape(-1), send_i, recv_i, group)
    ib_parts = torch.split(ib, [B * m * (Hp + Hkvp) for m in lengths])
    qb = from_seq(torch.cat([p[:B * m * Hp] for p, m in zip(ib_parts, lengths)]), Hp, ())
    kb = from_seq(torch.cat([p[B * m * Hp:] for p, m in zip(ib_parts, lengths)]), Hkvp, ())

    # ---- q, k, v: per destination [q | k | v] ------------------------------------------------
    cq, ck = B * Hp * D, B * Hkvp * D          # elements per token of each tensor
    x = torch.cat([to_heads(q, Hp).view(P, -1), to_heads(k, Hkvp).view(P, -1),
                   to_heads(v, Hkvp).view(P, -1)], 1)                         # (P, n*(cq+2ck))
    x = _comm.all_to_all(x.reshape(-1), [n * (cq + 2 * ck)] * P,
                         [m * (cq + 2 * ck) for m in lengths], group)
    parts = torch.split(x, [m * (cq + 2 * ck) for m in lengths])
    pick = [(0, cq), (cq, cq + ck), (cq + ck, cq + 2 * ck)]
    qf, kf, vf = ([torch.cat([p[m * a:m * b] for p, m in zip(parts, lengths)]) for a, b in pick])
    qh = from_seq(qf, Hp, (D,))                                               # (B, N, Hp, D)
    kh = from_seq(kf, Hkvp, (D,))                                             # (B, N, Hkvp, D)
    vh = from_seq(vf, Hkvp, (D,))

    with _comm.local_attention_range():
        o = bucketed_attention(qh, kh, vh, qb, kb, causal=causal, include_self=include_self,
                               softmax_scale=scale, backend=backend)          # (B, N, Hp, D)

    # ---- reverse: (B, N, Hp, D) -> this rank's (B, n, H, D) ------------------------------
    chunks = torch.split(o, lengths, dim=1)                                   # (B, n_s, Hp, D)
    o_send = torch.cat([c.reshape(-1) for c in chunks])
    o_recv = _comm.all_to_all(o_send, [B * m * Hp * D for m in lengths],
                              [B * n * Hp * D] * P, group)
    o_recv = o_recv.view(P, B, n, Hp, D).movedim(0, 2)                        # (B, n, P, Hp, D)
    return o_recv.reshape(B, n, H, D)
