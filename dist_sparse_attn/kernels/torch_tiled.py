"""Tiled PyTorch backend: the kernel's algorithm, vectorised over live tiles.

Streams are sorted by (bucket, position) and cut into blocks. Only the live
(query block, key block) pairs are visited: bucket ranges overlap (binary
search, see :func:`layout.kv_ranges`) and the key block is not wholly in the
causal future. Pairs are processed in chunks of batched matmuls with an online
softmax across chunks, so memory stays O(N * D) plus one chunk of scores, and
cost falls with the number of buckets. Runs anywhere PyTorch runs; it is the
CPU backend.
"""
from __future__ import annotations

import torch

from ..layout import _LOW, DROP, MAX_KEY, block_keys, kv_ranges, pad_rows
from ..plan import (AttentionPlan, from_streams, rows_from_streams, rows_to_streams,
                    to_streams)

_CHUNK_BYTES = 32 << 20         # scores of one chunk of tile pairs
_BLOCK = 128                    # rows per tile: fewer, larger matmuls pay on CPUs


def _block_size(plan: AttentionPlan) -> int:
    n = max(plan.Nq, plan.Nk)
    return _BLOCK if n >= _BLOCK else max(16, 1 << (n - 1).bit_length())


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Tiles:
    """Padded, blocked view of a plan's sorted streams and its live tile pairs."""

    def __init__(self, plan: AttentionPlan):
        bs = self.block = _block_size(plan)
        qk, kk = block_keys(plan.q_streams, bs), block_keys(plan.k_streams, bs)
        self.nqb, self.nkb = qk.n_blocks, kk.n_blocks
        Sq = plan.B * plan.H
        start, _, _, end = kv_ranges(qk, kk, plan.kv_of_q, causal=plan.causal,
                                     shift=plan.shift)                      # (Sq, nqb)
        start, end = start.long(), end.long()
        counts = (end - start).flatten()
        total = int(counts.sum())
        dev = start.device
        qtile = torch.repeat_interleave(torch.arange(Sq * self.nqb, device=dev), counts)
        first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        kblock = torch.repeat_interleave(start.flatten(), counts) \
            + torch.arange(total, device=dev) - first
        ktile = plan.kv_of_q[qtile // self.nqb] * self.nkb + kblock
        self.qtile, self.ktile = qtile, ktile                               # sorted by qtile
        self.n_pairs = qtile.numel()
        self.n_tiles_dense = Sq * self.nqb * self.nkb
        self._codes(plan)

    def pad(self, xs: torch.Tensor, nblocks: int) -> torch.Tensor:
        """Sorted (S, N, D) -> tiles (S * nblocks, block, D), zero padded."""
        S, N, D = xs.shape
        n = nblocks * self.block
        if n != N:
            xs = torch.cat([xs, xs.new_zeros(S, n - N, D)], dim=1)
        return xs.view(S * nblocks, self.block, D)

    def mask(self, qt, kt):
        """Allowed pairs inside tiles: (P, block, block) bool.

        Rows and columns carry one int64 code ``bucket << 32 | position``;
        allowed iff ``q_lo <= k_code <= q_hi`` (same bucket, causal position).
        """
        kc = self.k_code[kt][:, None, :]
        return (kc >= self.q_lo[qt][:, :, None]) & (kc <= self.q_hi[qt][:, :, None])

    def _codes(self, plan: AttentionPlan):
        bs = self.block
        qkey = pad_rows(plan.q_streams.key, self.nqb * bs, MAX_KEY).view(-1, bs)
        kkey = pad_rows(plan.k_streams.key, self.nkb * bs, MAX_KEY).view(-1, bs)
        self.k_code = torch.where(kkey >= (DROP << 32), -1, kkey)          # below every q_lo
        self.q_lo = (qkey >> 32) << 32                                      # (bucket, -inf)
        self.q_hi = (qkey - plan.shift) if plan.causal else (self.q_lo | _LOW)
        drop = qkey >= (DROP << 32)                                         # empty interval
        self.q_lo = torch.where(drop, 0, self.q_lo)
        self.q_hi = torch.where(drop, -2, self.q_hi)

    def chunks(self, dtype_bytes):
        step = max(1, _CHUNK_BYTES // (self.block * self.block * dtype_bytes))
        for c in range(0, self.n_pairs, step):
            yield self.qtile[c:c + step], self.ktile[c:c + step]


def _dead(streams):
    """(S, N) bool: the sorted rows that are dropped or padding (no allowed pair)."""
    return streams.key >= (DROP << 32)


def _live(x, streams):
    """Sorted rows ``to_streams(x, streams)`` with dropped and padding rows set to 0:
    their tiles weigh them by 0, which would turn a NaN or inf there into NaN."""
    return to_streams(x, streams).masked_fill(_dead(streams)[..., None], 0)


def tiled_forward(q, k, v, plan: AttentionPlan):
    """o (B, Nq, H, D) in q.dtype, lse (B, H, Nq) float32 and the lse in the compute dtype."""
    cdt = _compute_dtype(q.dtype)
    t = _Tiles(plan)
    bs, D = t.block, plan.D
    Q = t.pad(_live(q, plan.q_streams).to(cdt), t.nqb) * plan.scale         # (TQ, bs, D)
    K = t.pad(_live(k, plan.k_streams).to(cdt), t.nkb)                      # (TK, bs, D)
    V = t.pad(_live(v, plan.k_streams).to(cdt), t.nkb)
    TQ = Q.shape[0]
    m = torch.full((TQ, bs), float("-inf"), dtype=cdt, device=q.device)     # running max
    l = torch.zeros((TQ, bs), dtype=cdt, device=q.device)                   # running sum
    acc = torch.zeros((TQ, bs, D), dtype=cdt, device=q.device)
    for qt, kt in t.chunks(Q.element_size()):
        s = torch.bmm(Q[qt], K[kt].transpose(1, 2))                         # (P, bs, bs)
        s.masked_fill_(~t.mask(qt, kt), float("-inf"))
        # qt is sorted: merge this chunk's tiles into their query tiles
        uq, inv = torch.unique_consecutive(qt, return_inverse=True)
        m_chunk = torch.full((uq.numel(), bs), float("-inf"), dtype=cdt, device=q.device)
        m_chunk.scatter_reduce_(0, inv[:, None].expand(-1, bs), s.amax(-1), "amax")
        m_old = m[uq]
        m_new = torch.maximum(m_old, m_chunk)
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        alpha = torch.exp(m_old - m_safe)                                   # (U, bs)
        p = torch.exp(s - m_safe[inv][:, :, None])                          # masked -> 0
        l_chunk = torch.zeros_like(m_chunk).index_add_(0, inv, p.sum(-1))
        o_chunk = torch.zeros((uq.numel(), bs, D), dtype=cdt, device=q.device)
        o_chunk.index_add_(0, inv, torch.bmm(p, V[kt]))
        l[uq] = l[uq] * alpha + l_chunk
        acc[uq] = acc[uq] * alpha[:, :, None] + o_chunk
        m[uq] = m_new
    o = acc / torch.where(l > 0, l, torch.ones_like(l))[:, :, None]         # empty rows -> 0
    lse = m + torch.log(l)                                                  # empty rows -> -inf
    Sq = plan.B * plan.H
    o = o.view(Sq, -1, D)[:, :plan.Nq]
    lse = lse.view(Sq, -1)[:, :plan.Nq]
    lse = rows_from_streams(lse, plan.q_streams, plan.B)
    return from_streams(o, plan.q_streams, plan.B).to(q.dtype), lse.float(), lse


def tiled_backward(do, dlse, q, k, v, o, lse, lse_c, plan: AttentionPlan):
    """Gradients (dq, dk, dv) of :func:`tiled_forward`; ``dlse`` may be None.

    ``lse_c`` is the lse in the compute dtype (float64 inputs keep float64)."""
    return _backward(do, dlse, q, k, v, o, lse_c, plan)


def _backward(do, dlse, q, k, v, o, lse, plan: AttentionPlan):
    cdt = _compute_dtype(q.dtype)
    t = _Tiles(plan)
    bs, D = t.block, plan.D
    Q = t.pad(_live(q, plan.q_streams).to(cdt), t.nqb) * plan.scale         # (TQ, bs, D)
    K = t.pad(_live(k, plan.k_streams).to(cdt), t.nkb)                      # (TK, bs, D)
    V = t.pad(_live(v, plan.k_streams).to(cdt), t.nkb)
    dO_s = _live(do, plan.q_streams).to(cdt)                                # (Sq, Nq, D)
    O_s = _live(o, plan.q_streams).to(cdt)
    delta = (dO_s * O_s).sum(-1)                                            # (Sq, Nq)
    if dlse is not None:    # d lse_i / d s_ij = p_ij, folded into delta
        delta = delta - rows_to_streams(dlse.to(cdt), plan.q_streams).masked_fill(
            _dead(plan.q_streams), 0)
    lse_s = rows_to_streams(lse.to(cdt), plan.q_streams)
    lse_s = torch.where(torch.isinf(lse_s), torch.zeros_like(lse_s), lse_s)
    dO = t.pad(dO_s, t.nqb)
    delta = pad_rows(delta, t.nqb * bs, 0.0).view(-1, bs)                   # (TQ, bs)
    lse_t = pad_rows(lse_s, t.nqb * bs, 0.0).view(-1, bs)
    dQ, dK, dV = torch.zeros_like(Q), torch.zeros_like(K), torch.zeros_like(V)
    for qt, kt in t.chunks(Q.element_size()):
        s = torch.bmm(Q[qt], K[kt].transpose(1, 2))                         # (P, bs, bs)
        p = torch.exp(s - lse_t[qt][:, :, None])
        p.masked_fill_(~t.mask(qt, kt), 0.0)
        dV.index_add_(0, kt, torch.bmm(p.transpose(1, 2), dO[qt]))
        dp = torch.bmm(dO[qt], V[kt].transpose(1, 2))                       # (P, bs, bs)
        ds = p * (dp - delta[qt][:, :, None])
        dQ.index_add_(0, qt, torch.bmm(ds, K[kt]))
        dK.index_add_(0, kt, torch.bmm(ds.transpose(1, 2), Q[qt]))
    Sq, Sk = plan.B * plan.H, plan.B * plan.Hkv
    # Q was pre-scaled, so dK = dS^T (scale Q) needs no further factor
    dq = from_streams((dQ * plan.scale).view(Sq, -1, D)[:, :plan.Nq], plan.q_streams, plan.B)
    dk = from_streams(dK.view(Sk, -1, D)[:, :plan.Nk], plan.k_streams, plan.B)
    dv = from_streams(dV.view(Sk, -1, D)[:, :plan.Nk], plan.k_streams, plan.B)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def tile_stats(plan: AttentionPlan):
    """Live (computed) tiles, all tiles of the full Nq x Nk grid, block size (for reporting)."""
    t = _Tiles(plan)
    return {"block": t.block, "live_tiles": t.n_pairs, "all_tiles": t.n_tiles_dense}
