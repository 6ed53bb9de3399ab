"""Triton sparse flash attention over the sorted (bucket, position) layout.

Kernels (the forward launches the gather and ``_fwd_kernel``; the backward the gather
and the two backward kernels):

* ``_gather_kernel``   copies the rows of q and of k, v into sorted order, each
                       stream contiguous (S, N, D); one launch for both sides. In the
                       backward it also gathers dO and computes delta = rowsum(dO * O)
* ``_fwd_kernel``      one program per (query block, query stream)
* ``_bwd_dkdv_kernel`` one program per (key block, kv stream): dK, dV
* ``_bwd_dq_kernel``   one program per (query block, query stream): dQ
* ``_ranges_kernel``   the block ranges of a tile shape (the searches of
                       ``layout.kv_ranges`` / ``q_ranges``), once per plan and tile shape

Every tile a program reads is then a contiguous block of rows: a plain block load
or, on Hopper (sm_90+) where it measured faster, a TMA tensor-descriptor load.
Outputs and gradients are written back through the sort index (``QIDX``/``KIDX``,
original token numbers) to the caller's (B, N, heads, D) tensors. The sorted copies
live only inside one launch sequence: the backward gathers again (a copy pass over
q, k, v, dO) instead of keeping three more activations per layer alive.

A program visits only the key (or query) blocks that ``layout.kv_ranges`` /
``layout.q_ranges`` find by binary search, in three runs: partial blocks, *full*
blocks (one shared bucket, wholly in the causal past: no element mask at all),
partial blocks again.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..plan import AttentionPlan
from . import interpreting

try:                                    # host-side TMA descriptors (Triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:                     # pragma: no cover - older Triton: block loads only
    TensorDescriptor = None

_INTERPRET = interpreting()
_LOG2E = 1.4426950408889634     # exp(x) = exp2(x * log2(e))


# --------------------------------------------------------------------------- #
# Tile helpers
# --------------------------------------------------------------------------- #
@triton.jit
def _row_bounds(qkey, CAUSAL: tl.constexpr, SHIFT: tl.constexpr):
    """Per query row, the interval [lo, hi] of key sort keys it may attend:
    same bucket, position <= its own - SHIFT (any position if not causal).
    Dropped and padding rows get an empty interval."""
    DROPKEY: tl.constexpr = 2147483647 << 32
    lo = (qkey >> 32) << 32
    if CAUSAL:
        hi = qkey - SHIFT
    else:
        hi = lo | 4294967295
    hi = tl.where(qkey < DROPKEY, hi, -1)
    return lo, hi


@triton.jit
def _allowed(lo, hi, kkey):
    """[BM, BN] element mask; dropped/padding keys lie above every valid hi."""
    return (kkey[None, :] >= lo[:, None]) & (kkey[None, :] <= hi[:, None])


@triton.jit
def _allowed_t(kkey, lo, hi):
    """[BN, BM] transposed element mask."""
    return (kkey[:, None] >= lo[None, :]) & (kkey[:, None] <= hi[None, :])


@triton.jit
def _load_rows(base, idx, stride_n, offs_d, row_ok, D: tl.constexpr):
    """[len(idx), BLOCK_D] tile of rows ``idx`` (token numbers) of a (N, D) slice."""
    ptrs = base + idx.to(tl.int64)[:, None] * stride_n + offs_d[None, :]
    return tl.load(ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _tile(XS, desc, stream, N, start, D: tl.constexpr, BLOCK: tl.constexpr,
          BLOCK_D: tl.constexpr, TMA: tl.constexpr, UPCAST: tl.constexpr):
    """[BLOCK, BLOCK_D] rows [start, start + BLOCK) of sorted stream ``stream`` of
    ``XS`` (S, N, D) contiguous; rows past N (and columns past D) read 0. ``TMA``:
    through the tensor descriptor ``desc`` (block [1, BLOCK, D], zero-filled out of
    bounds) instead of pointers."""
    if TMA:
        x = desc.load([stream, start, 0]).reshape(BLOCK, BLOCK_D)
    else:
        rows = start + tl.arange(0, BLOCK)
        offs_d = tl.arange(0, BLOCK_D)
        x = tl.load(XS + (stream.to(tl.int64) * N + rows)[:, None] * D + offs_d[None, :],
                    mask=(rows < N)[:, None] & (offs_d[None, :] < D), other=0.0)
    if UPCAST:      # the interpreter multiplies raw bf16 bits: compute in fp32
        x = x.to(tl.float32)
    return x


# --------------------------------------------------------------------------- #
# Gather into sorted order (and, backward, delta = rowsum(dO * O) - dlse)
# --------------------------------------------------------------------------- #
@triton.jit
def _gather_kernel(Q, K, V, O, DO, DLSE, QS, KS, VS, DOS, DELTA_S, QIDX, KIDX, QKEY, KKEY,
                   stride_qb, stride_qn, stride_qh,
                   stride_kb, stride_kn, stride_kh,
                   stride_vb, stride_vn, stride_vh,
                   stride_ob, stride_on, stride_oh,
                   stride_dob, stride_don, stride_doh,
                   H, HKV, Nq, Nk, S_q,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr,
                   BACKWARD: tl.constexpr, HAS_DLSE: tl.constexpr):
    """Grid (cdiv(max(Nq, Nk), BLOCK), S_q + S_k): programs of axis 1 below S_q copy
    query-stream rows (q; backward also dO, and delta from O and dO), the others
    kv-stream rows (k and v). Dropped and padding rows (sort key >= DROP << 32: no
    allowed pair) are written as zeros without reading their source: a tile that holds
    them multiplies them by 0, and with query/key dropping they are most of the rows."""
    pid = tl.program_id(0)
    s = tl.program_id(1)
    DROPKEY: tl.constexpr = 2147483647 << 32
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    if s < S_q:
        b = (s // H).to(tl.int64)           # int64 offsets: h * stride_qh may pass 2**31
        h = (s % H).to(tl.int64)
        ok = offs < Nq
        row0 = s.to(tl.int64) * Nq
        idx = tl.load(QIDX + row0 + offs, mask=ok, other=0)
        live = tl.load(QKEY + row0 + offs, mask=ok, other=DROPKEY) < DROPKEY
        dst = (row0 + offs)[:, None] * D + offs_d[None, :]
        m = ok[:, None] & (offs_d[None, :] < D)
        q = _load_rows(Q + b * stride_qb + h * stride_qh, idx, stride_qn,
                       offs_d, live, D)
        tl.store(QS + dst, q, mask=m)
        if BACKWARD:
            do = _load_rows(DO + b * stride_dob + h * stride_doh, idx,
                            stride_don, offs_d, live, D)
            tl.store(DOS + dst, do, mask=m)
            o = _load_rows(O + b * stride_ob + h * stride_oh, idx, stride_on,
                           offs_d, live, D)
            delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
            if HAS_DLSE:    # d lse_i / d s_ij = p_ij: folds into delta
                delta = delta - tl.load(DLSE + row0 + idx, mask=live, other=0.0)
            tl.store(DELTA_S + row0 + offs, delta, mask=ok)
    else:
        sk = s - S_q
        b = (sk // HKV).to(tl.int64)
        hk = (sk % HKV).to(tl.int64)
        ok = offs < Nk
        row0 = sk.to(tl.int64) * Nk
        idx = tl.load(KIDX + row0 + offs, mask=ok, other=0)
        live = tl.load(KKEY + row0 + offs, mask=ok, other=DROPKEY) < DROPKEY
        dst = (row0 + offs)[:, None] * D + offs_d[None, :]
        m = ok[:, None] & (offs_d[None, :] < D)
        k = _load_rows(K + b * stride_kb + hk * stride_kh, idx, stride_kn,
                       offs_d, live, D)
        tl.store(KS + dst, k, mask=m)
        v = _load_rows(V + b * stride_vb + hk * stride_vh, idx, stride_vn,
                       offs_d, live, D)
        tl.store(VS + dst, v, mask=m)


# --------------------------------------------------------------------------- #
# Forward
# --------------------------------------------------------------------------- #
@triton.jit
def _fwd_inner(acc, m_i, l_i, q, q_lo, q_hi, KS, VS, kd, vd, KKEY, kvs, kv_row0,
               lo, hi, Nk, qk_scale,
               D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, SHIFT: tl.constexpr,
               DOT_PREC: tl.constexpr, TMA: tl.constexpr, UPCAST: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    for j in range(lo, hi):
        start = j * BLOCK_N
        k = _tile(KS, kd, kvs, Nk, start, D, BLOCK_N, BLOCK_D, TMA, UPCAST)   # [BN, BD]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale      # [BM, BN], log2
        if MASKED:
            cols = start + offs_n
            kkey = tl.load(KKEY + kv_row0 + cols, mask=cols < Nk, other=9223372036854775807)
            s = tl.where(_allowed(q_lo, q_hi, kkey), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # rows with nothing allowed yet keep max -inf: shift by 0 instead
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new
        alpha = tl.exp2(m_i - m_use)                                         # [BM]
        p = tl.exp2(s - m_use[:, None])                                      # [BM, BN]
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _tile(VS, vd, kvs, Nk, start, D, BLOCK_N, BLOCK_D, TMA, UPCAST)   # [BN, BD]
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(QS, KS, VS, qd, kd, vd, O, LSE, LSE_S,
                QIDX, QKEY, KKEY,
                R_START, R_FLO, R_FHI, R_END,
                stride_ob, stride_on, stride_oh,
                H, HKV, Nq, Nk, n_qblocks, qk_scale,
                D: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                CAUSAL: tl.constexpr, SHIFT: tl.constexpr, DOT_PREC: tl.constexpr,
                TMA: tl.constexpr, UPCAST: tl.constexpr):
    # heavy blocks first: within a bucket (and under a causal diagonal) the last query
    # blocks see the most key blocks, so launch them first and finish on light ones
    pid_m = n_qblocks - 1 - tl.program_id(0)
    s = tl.program_id(1)                                              # query stream b * H + h
    b = s // H
    h = s % H
    kvs = b * HKV + h // (H // HKV)                                   # its kv stream
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Nq
    q_row0 = s.to(tl.int64) * Nq
    kv_row0 = kvs.to(tl.int64) * Nk
    qidx = tl.load(QIDX + q_row0 + offs_m, mask=row_ok, other=0)
    q_lo, q_hi = _row_bounds(tl.load(QKEY + q_row0 + offs_m, mask=row_ok, other=9223372036854775807),
                             CAUSAL, SHIFT)
    q = _tile(QS, qd, s, Nq, pid_m * BLOCK_M, D, BLOCK_M, BLOCK_D, TMA, UPCAST)  # [BM, BD]

    r = s * n_qblocks + pid_m
    lo = tl.load(R_START + r)
    f_lo = tl.load(R_FLO + r)
    f_hi = tl.load(R_FHI + r)
    hi = tl.load(R_END + r)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # stage 1: partial blocks before the full run (bucket edge)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, q_lo, q_hi, KS, VS, kd, vd, KKEY, kvs,
                               kv_row0, lo, f_lo, Nk, qk_scale, D, BLOCK_D, BLOCK_N, True,
                               CAUSAL, SHIFT, DOT_PREC, TMA, UPCAST)
    # stage 2: full blocks, no element mask
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, q_lo, q_hi, KS, VS, kd, vd, KKEY, kvs,
                               kv_row0, f_lo, f_hi, Nk, qk_scale, D, BLOCK_D, BLOCK_N, False,
                               CAUSAL, SHIFT, DOT_PREC, TMA, UPCAST)
    # stage 3: partial blocks after it (causal diagonal, next bucket)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, q_lo, q_hi, KS, VS, kd, vd, KKEY, kvs,
                               kv_row0, f_hi, hi, Nk, qk_scale, D, BLOCK_D, BLOCK_N, True,
                               CAUSAL, SHIFT, DOT_PREC, TMA, UPCAST)

    has = l_i > 0.0                                                   # rows with an allowed key
    o = acc / tl.where(has, l_i, 1.0)[:, None]                        # empty rows: 0
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))                                     # natural log units
    o_ptrs = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh \
        + qidx.to(tl.int64)[:, None] * stride_on + offs_d[None, :]
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))
    tl.store(LSE + q_row0 + qidx, lse, mask=row_ok)                   # (B, H, Nq) layout
    # for the backward: sorted order, log2 units, 0 for empty rows (all masked there)
    tl.store(LSE_S + q_row0 + offs_m, tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), 0.0),
             mask=row_ok)


# --------------------------------------------------------------------------- #
# Backward: dK, dV (one program per key block)
# --------------------------------------------------------------------------- #
@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, kkey, QS, DOS, qd, dod, LSE_S, DELTA_S, QKEY, s, q_row0,
                    lo, hi, Nq, qk_scale,
                    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    MASKED: tl.constexpr, CAUSAL: tl.constexpr, SHIFT: tl.constexpr,
                    DOT_PREC: tl.constexpr, TMA: tl.constexpr, UPCAST: tl.constexpr):
    # Everything is computed transposed ([BN, BM]): S^T = K Q^T, dV += P^T dO, dK += dS^T Q.
    offs_m = tl.arange(0, BLOCK_M)
    for i in range(lo, hi):
        start = i * BLOCK_M
        rows = start + offs_m                                         # [BM] sorted slots
        row_ok = rows < Nq
        q = _tile(QS, qd, s, Nq, start, D, BLOCK_M, BLOCK_D, TMA, UPCAST)     # [BM, BD]
        do = _tile(DOS, dod, s, Nq, start, D, BLOCK_M, BLOCK_D, TMA, UPCAST)  # [BM, BD]
        # lse (log2 units, 0 for empty rows) and delta, stored in sorted order
        lse = tl.load(LSE_S + q_row0 + rows, mask=row_ok, other=0.0)
        di = tl.load(DELTA_S + q_row0 + rows, mask=row_ok, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale      # [BN, BM]
        pt = tl.exp2(st - lse[None, :])
        if MASKED:
            q_lo, q_hi = _row_bounds(tl.load(QKEY + q_row0 + rows, mask=row_ok, other=9223372036854775807),
                                     CAUSAL, SHIFT)
            pt = tl.where(_allowed_t(kkey, q_lo, q_hi), pt, 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)              # [BN, BM]
        dst = pt * (dpt - di[None, :])
        # softmax scale applied once at the end
        dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(QS, KS, VS, DOS, qd, kd, vd, dod, DK, DV, LSE_S, DELTA_S,
                     KIDX, QKEY, KKEY,
                     R_START, R_FLO, R_FHI, R_END,
                     stride_dkb, stride_dkn, stride_dkh,
                     stride_dvb, stride_dvn, stride_dvh,
                     H, HKV, Nq, Nk, n_kblocks, qk_scale, sm_scale,
                     D: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     CAUSAL: tl.constexpr, SHIFT: tl.constexpr, DOT_PREC: tl.constexpr,
                     TMA: tl.constexpr, UPCAST: tl.constexpr):
    pid_n = tl.program_id(0)
    kvs = tl.program_id(1)                                            # kv stream b * HKV + hk
    b = kvs // HKV
    hk = kvs % HKV
    G = H // HKV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < Nk
    kv_row0 = kvs.to(tl.int64) * Nk
    kidx = tl.load(KIDX + kv_row0 + offs_n, mask=col_ok, other=0)
    kkey = tl.load(KKEY + kv_row0 + offs_n, mask=col_ok, other=9223372036854775807)
    k = _tile(KS, kd, kvs, Nk, pid_n * BLOCK_N, D, BLOCK_N, BLOCK_D, TMA, UPCAST)  # [BN, BD]
    v = _tile(VS, vd, kvs, Nk, pid_n * BLOCK_N, D, BLOCK_N, BLOCK_D, TMA, UPCAST)  # [BN, BD]
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(G):                                                # query heads of this kv head
        s = b * H + hk * G + g
        q_row0 = s.to(tl.int64) * Nq
        r = s * n_kblocks + pid_n
        lo = tl.load(R_START + r)
        f_lo = tl.load(R_FLO + r)
        f_hi = tl.load(R_FHI + r)
        hi = tl.load(R_END + r)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, kkey, QS, DOS, qd, dod, LSE_S, DELTA_S, QKEY,
                                 s, q_row0, lo, f_lo, Nq, qk_scale, D, BLOCK_D, BLOCK_M, True,
                                 CAUSAL, SHIFT, DOT_PREC, TMA, UPCAST)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, kkey, QS, DOS, qd, dod, LSE_S, DELTA_S, QKEY,
                                 s, q_row0, f_lo, f_hi, Nq, qk_scale, D, BLOCK_D, BLOCK_M, False,
                                 CAUSAL, SHIFT, DOT_PREC, TMA, UPCAST)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, kkey, QS, DOS, qd, dod, LSE_S, DELTA_S, QKEY,
                                 s, q_row0, f_hi, hi, Nq, qk_scale, D, BLOCK_D, BLOCK_M, True,
                                 CAUSAL, SHIFT, DOT_PREC, TMA, UPCAST)
    mask = col_ok[:, None] & (offs_d[None, :] < D)
    rows = kidx.to(tl.int64)[:, None]
    tl.store(DK + b.to(tl.int64) * stride_dkb + hk.to(tl.int64) * stride_dkh + rows * stride_dkn
             + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + b.to(tl.int64) * stride_dvb + hk.to(tl.int64) * stride_dvh + rows * stride_dvn
             + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- #
# Backward: dQ (one program per query block)
# --------------------------------------------------------------------------- #
@triton.jit
def _bwd_dq_inner(dq, q, do, lse, di, q_lo, q_hi, KS, VS, kd, vd, KKEY, kvs, kv_row0,
                  lo, hi, Nk, qk_scale,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                  MASKED: tl.constexpr, CAUSAL: tl.constexpr, SHIFT: tl.constexpr,
                  DOT_PREC: tl.constexpr, TMA: tl.constexpr, UPCAST: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    for j in range(lo, hi):
        start = j * BLOCK_N
        k = _tile(KS, kd, kvs, Nk, start, D, BLOCK_N, BLOCK_D, TMA, UPCAST)   # [BN, BD]
        v = _tile(VS, vd, kvs, Nk, start, D, BLOCK_N, BLOCK_D, TMA, UPCAST)   # [BN, BD]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale      # [BM, BN]
        p = tl.exp2(s - lse[:, None])
        if MASKED:
            cols = start + offs_n
            kkey = tl.load(KKEY + kv_row0 + cols, mask=cols < Nk, other=9223372036854775807)
            p = tl.where(_allowed(q_lo, q_hi, kkey), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)               # [BM, BN]
        ds = p * (dp - di[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
    return dq


@triton.jit
def _bwd_dq_kernel(QS, KS, VS, DOS, qd, kd, vd, dod, DQ, LSE_S, DELTA_S,
                   QIDX, QKEY, KKEY,
                   R_START, R_FLO, R_FHI, R_END,
                   stride_dqb, stride_dqn, stride_dqh,
                   H, HKV, Nq, Nk, n_qblocks, qk_scale, sm_scale,
                   D: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, SHIFT: tl.constexpr, DOT_PREC: tl.constexpr,
                   TMA: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = n_qblocks - 1 - tl.program_id(0)                          # heavy first (as _fwd_kernel)
    s = tl.program_id(1)
    b = s // H
    h = s % H
    kvs = b * HKV + h // (H // HKV)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Nq
    q_row0 = s.to(tl.int64) * Nq
    kv_row0 = kvs.to(tl.int64) * Nk
    qidx = tl.load(QIDX + q_row0 + offs_m, mask=row_ok, other=0)
    q_lo, q_hi = _row_bounds(tl.load(QKEY + q_row0 + offs_m, mask=row_ok, other=9223372036854775807),
                             CAUSAL, SHIFT)
    q = _tile(QS, qd, s, Nq, pid_m * BLOCK_M, D, BLOCK_M, BLOCK_D, TMA, UPCAST)
    do = _tile(DOS, dod, s, Nq, pid_m * BLOCK_M, D, BLOCK_M, BLOCK_D, TMA, UPCAST)
    lse = tl.load(LSE_S + q_row0 + offs_m, mask=row_ok, other=0.0)   # sorted order
    di = tl.load(DELTA_S + q_row0 + offs_m, mask=row_ok, other=0.0)
    r = s * n_qblocks + pid_m
    lo = tl.load(R_START + r)
    f_lo = tl.load(R_FLO + r)
    f_hi = tl.load(R_FHI + r)
    hi = tl.load(R_END + r)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dq = _bwd_dq_inner(dq, q, do, lse, di, q_lo, q_hi, KS, VS, kd, vd, KKEY, kvs, kv_row0,
                       lo, f_lo, Nk, qk_scale, D, BLOCK_D, BLOCK_N, True, CAUSAL, SHIFT,
                       DOT_PREC, TMA, UPCAST)
    dq = _bwd_dq_inner(dq, q, do, lse, di, q_lo, q_hi, KS, VS, kd, vd, KKEY, kvs, kv_row0,
                       f_lo, f_hi, Nk, qk_scale, D, BLOCK_D, BLOCK_N, False, CAUSAL, SHIFT,
                       DOT_PREC, TMA, UPCAST)
    dq = _bwd_dq_inner(dq, q, do, lse, di, q_lo, q_hi, KS, VS, kd, vd, KKEY, kvs, kv_row0,
                       f_hi, hi, Nk, qk_scale, D, BLOCK_D, BLOCK_N, True, CAUSAL, SHIFT,
                       DOT_PREC, TMA, UPCAST)
    tl.store(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
             + qidx.to(tl.int64)[:, None] * stride_dqn + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < D))


# --------------------------------------------------------------------------- #
# Block ranges: the binary searches of layout.kv_ranges / layout.q_ranges, fused
# --------------------------------------------------------------------------- #
@triton.jit
def _edge_key(KEY, row0, blk, BS, N):
    """(first, last) sort key of blocks ``blk`` of BS rows; padding rows = max int64."""
    first = tl.load(KEY + row0 + blk * BS, mask=blk * BS < N, other=9223372036854775807)
    li = blk * BS + BS - 1
    last = tl.load(KEY + row0 + li, mask=li < N, other=9223372036854775807)
    return first, last


@triton.jit
def _search(KEY, row0, BS, N, nb, x, n_iter, LAST: tl.constexpr, RIGHT: tl.constexpr):
    """Vectorised searchsorted over the ascending first (or last) keys of the
    nb blocks of one stream: how many blocks have edge key < x (<= x if RIGHT)."""
    lo = tl.zeros(x.shape, tl.int32)
    hi = tl.zeros(x.shape, tl.int32) + nb
    for _ in range(n_iter):
        active = lo < hi
        mid = (lo + hi) // 2
        idx = mid * BS + (BS - 1 if LAST else 0)
        a = tl.load(KEY + row0 + idx, mask=active & (idx < N), other=9223372036854775807)
        go_right = (a <= x) if RIGHT else (a < x)
        lo = tl.where(active & go_right, mid + 1, lo)
        hi = tl.where(active & (~go_right), mid, hi)
    return lo


@triton.jit
def _ranges_kernel(SELF_KEY, OTHER_KEY, R_START, R_FLO, R_FHI, R_END,
                   H, HKV, N_self, N_other, BS_self, BS_other, nb_self, nb_other, n_iter,
                   n_iter_self,
                   TRANSPOSED: tl.constexpr, CAUSAL: tl.constexpr, SHIFT: tl.constexpr,
                   VB: tl.constexpr):
    """Grid (cdiv(nb_self, VB), S_q). Not transposed: the blocks are query
    blocks of query stream s, searched among its kv stream's key blocks.
    Transposed: key blocks of s's kv stream, searched among s's query blocks."""
    s = tl.program_id(1)
    kvs = (s // H) * HKV + (s % H) // (H // HKV)
    if TRANSPOSED:
        self_stream = kvs
        other_stream = s
    else:
        self_stream = s
        other_stream = kvs
    srow0 = self_stream.to(tl.int64) * N_self
    orow0 = other_stream.to(tl.int64) * N_other
    blk = tl.program_id(0) * VB + tl.arange(0, VB)
    ok = blk < nb_self
    first, last = _edge_key(SELF_KEY, srow0, blk, BS_self, N_self)
    # valid rows come first (dropped keys sort last): count them by binary search
    DROPKEY: tl.constexpr = 2147483647 << 32
    lo = 0
    hi = N_self
    for _ in range(n_iter_self):
        mid = (lo + hi) // 2
        a = tl.load(SELF_KEY + srow0 + mid, mask=lo < hi, other=DROPKEY)
        lo = tl.where((lo < hi) & (a < DROPKEY), mid + 1, lo)
        hi = tl.where((lo < hi) & (a >= DROPKEY), mid, hi)
    nvalid = lo
    # largest valid key of the block: rows [blk*BS, nvalid) are valid
    lv_i = tl.minimum(blk * BS_self + BS_self - 1, nvalid - 1)
    last_valid = tl.load(SELF_KEY + srow0 + lv_i, mask=ok & (blk * BS_self < nvalid), other=-1)
    LOW: tl.constexpr = 4294967295
    no_rows = first >= DROPKEY
    uniform = (last < DROPKEY) & ((first >> 32) == (last >> 32))
    bucket0 = (first >> 32) << 32
    if TRANSPOSED:      # self = key block, other = query blocks
        start = _search(OTHER_KEY, orow0, BS_other, N_other, nb_other,
                        (first + SHIFT) if CAUSAL else bucket0, n_iter, True, False)
        end = _search(OTHER_KEY, orow0, BS_other, N_other, nb_other,
                      ((last_valid >> 32) << 32) | LOW, n_iter, False, True)
        f_lo = _search(OTHER_KEY, orow0, BS_other, N_other, nb_other,
                       (last + SHIFT) if CAUSAL else bucket0, n_iter, False, False)
        f_hi = _search(OTHER_KEY, orow0, BS_other, N_other, nb_other,
                       bucket0 | LOW, n_iter, True, True)
    else:               # self = query block, other = key blocks
        start = _search(OTHER_KEY, orow0, BS_other, N_other, nb_other, bucket0, n_iter,
                        True, False)
        end = _search(OTHER_KEY, orow0, BS_other, N_other, nb_other,
                      (last_valid - SHIFT) if CAUSAL else (((last_valid >> 32) << 32) | LOW),
                      n_iter, False, True)
        f_lo = _search(OTHER_KEY, orow0, BS_other, N_other, nb_other, bucket0, n_iter,
                       False, False)
        f_hi = _search(OTHER_KEY, orow0, BS_other, N_other, nb_other,
                       (first - SHIFT) if CAUSAL else (bucket0 | LOW), n_iter, True, True)
    end = tl.where(no_rows, start, tl.maximum(start, end))
    f_lo = tl.minimum(tl.where(uniform, tl.maximum(f_lo, start), end), end)
    f_hi = tl.minimum(tl.maximum(tl.where(uniform, f_hi, end), f_lo), end)
    out = s.to(tl.int64) * nb_self + blk
    tl.store(R_START + out, start, mask=ok)
    tl.store(R_FLO + out, f_lo, mask=ok)
    tl.store(R_FHI + out, f_hi, mask=ok)
    tl.store(R_END + out, end, mask=ok)


# --------------------------------------------------------------------------- #
# Host side: block sizes, metadata, launches
# --------------------------------------------------------------------------- #
def _config(D: int, dtype: torch.dtype, kind: str, tiles=None):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, for bf16/fp16 measured on an
    H200 (Triton 3.6, B=2, H=16, N=16k-32k, hash and dense); ``tiles``: the caller's
    choice instead (tuning runs)."""
    if tiles is not None:
        return _check_tiles(tiles, kind)
    big = dtype == torch.float32 or D > 128
    if _INTERPRET:
        return 32, 32, 4, 1
    if dtype == torch.float32 and D > 128:
        # float32 rows wider than 128 in 64-row tiles spill registers so heavily that
        # compiling the kernel did not finish in 5 minutes (H200, Triton 3.6)
        return 32, 32, 8, 1
    if kind == "dkdv":
        return (32, 64, 4, 2) if big else (32, 64, 4, 3)
    if kind == "dq" and 64 < D <= 128 and not big:
        return 128, 64, 8, 3        # D=128: 2.0 ms against 2.6 ms with 64 x 64 tiles
    # fwd (and dq up to D=64) share a tile shape, so they share one set of block ranges
    return (64, 64, 4, 2) if big else (64, 64, 4, 3)


def _use_tma(tma, kind: str, D: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a kernel loads its tiles through TMA descriptors. ``tma`` None: where it
    measured faster than block loads (H200, Triton 3.6): the forward and dQ at D = 64 in
    bf16/fp16 (forward 1.07 against 1.23 ms, hash 16 buckets, 32k); the dK/dV kernel
    and D = 128 were as fast or faster with block loads. Needs sm_90+. True / False:
    the caller's choice (tests, tuning); True refuses a head dim TMA cannot tile."""
    if tma is None:
        return (TensorDescriptor is not None and not _INTERPRET and kind in ("fwd", "dq")
                and D == 64 and dtype in (torch.bfloat16, torch.float16)
                and device.type == "cuda" and _capability(device) >= 9)
    if tma and (TensorDescriptor is None or D != _block_d(D)):
        raise ValueError(f"TMA tile loads need Triton's TensorDescriptor and a power-of-two "
                         f"head dim >= 16, got D={D}")
    return bool(tma)


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> int:
    return torch.cuda.get_device_capability(device)[0]


def _descriptors(tma: bool, *pairs):
    """One TMA descriptor per (sorted tensor (S, N, D), block rows) pair, or 0s (unused
    arguments) without TMA."""
    if not tma:
        return [0] * len(pairs)
    return [TensorDescriptor(x, shape=list(x.shape), strides=[x.shape[1] * x.shape[2], x.shape[2], 1],
                             block_shape=[1, rows, x.shape[2]]) for x, rows in pairs]


def _check_tiles(tiles, kind):
    t = tuple(tiles) if isinstance(tiles, (tuple, list)) else None
    if t is None or len(t) != 4 or any(isinstance(x, bool) or not isinstance(x, int) or x < 1
                                       for x in t) \
            or any(b < 16 or b & (b - 1) for b in t[:2]):
        raise ValueError(f"{kind} tiles must be (BLOCK_M, BLOCK_N, num_warps, num_stages), "
                         f"positive ints with power-of-two blocks >= 16, got {tiles!r}")
    return t


def _block_d(D):
    return max(16, triton.next_power_of_2(D))


def _dot_precision(dtype):
    # fp32 inputs promise ~1e-5 relative error: no tf32
    return "ieee" if dtype == torch.float32 else "tf32"


def _ranges(plan: AttentionPlan, bm: int, bn: int, transposed: bool):
    """Block ranges (start, full_lo, full_hi, end), each (S_q, nb) int32, from one
    launch of ``_ranges_kernel`` (``layout.kv_ranges`` / ``q_ranges`` compute the
    same in PyTorch)."""
    key = ("q" if transposed else "kv", bm, bn)
    if key in plan.cache:
        return plan.cache[key]
    qs, ks = plan.q_streams, plan.k_streams
    if transposed:
        self_key, other_key, bs_self, bs_other = ks.key, qs.key, bn, bm
        n_self, n_other = plan.Nk, plan.Nq
    else:
        self_key, other_key, bs_self, bs_other = qs.key, ks.key, bm, bn
        n_self, n_other = plan.Nq, plan.Nk
    nb_self, nb_other = triton.cdiv(n_self, bs_self), triton.cdiv(n_other, bs_other)
    S = plan.B * plan.H
    out = [torch.empty((S, nb_self), device=self_key.device, dtype=torch.int32)
           for _ in range(4)]
    vb = 64 if _INTERPRET else 128
    _ranges_kernel[(triton.cdiv(nb_self, vb), S)](
        self_key, other_key, *out,
        plan.H, plan.Hkv, n_self, n_other, bs_self, bs_other, nb_self, nb_other,
        max(1, nb_other.bit_length()), max(1, n_self.bit_length()),
        TRANSPOSED=transposed, CAUSAL=plan.causal, SHIFT=plan.shift, VB=vb)
    plan.cache[key] = tuple(out)
    return plan.cache[key]


def _check_head_dim(D):
    if D > 256:
        raise ValueError(f"the Triton backend supports head dims up to 256, got D={D}")


def _gather(plan: AttentionPlan, q, k, v, o=None, do=None, dlse=None):
    """Sorted contiguous copies (S, N, D) of q, k, v (and with ``do``: of dO, and delta
    (S_q, Nq) float32 in sorted order), in one launch."""
    B, Nq, H, D = q.shape
    Nk, Hkv = k.shape[1], k.shape[2]
    qs = torch.empty((B * H, Nq, D), device=q.device, dtype=q.dtype)
    ks = torch.empty((B * Hkv, Nk, D), device=q.device, dtype=k.dtype)
    vs = torch.empty((B * Hkv, Nk, D), device=q.device, dtype=v.dtype)
    backward = do is not None
    if backward:
        dos = torch.empty((B * H, Nq, D), device=q.device, dtype=do.dtype)
        delta_s = torch.empty((B * H, Nq), device=q.device, dtype=torch.float32)
        dlse_c = dlse.float().contiguous() if dlse is not None else delta_s
    else:
        o = do = dos = delta_s = dlse_c = qs            # unused arguments
    block = 32 if _INTERPRET else 128
    qidx, kidx = plan.q_streams.index, plan.k_streams.index
    _gather_kernel[(triton.cdiv(max(Nq, Nk), block), B * H + B * Hkv)](
        q, k, v, o, do, dlse_c, qs, ks, vs, dos, delta_s, qidx, kidx,
        plan.q_streams.key, plan.k_streams.key,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        do.stride(0), do.stride(1), do.stride(2), H, Hkv, Nq, Nk, B * H,
        D=D, BLOCK_D=_block_d(D), BLOCK=block, BACKWARD=backward, HAS_DLSE=dlse is not None)
    return (qs, ks, vs, dos, delta_s) if backward else (qs, ks, vs)


def triton_forward(q, k, v, plan: AttentionPlan, *, tiles=None, tma=None):
    """o (B, Nq, H, D) in q.dtype, lse (B, H, Nq) float32, and for the backward
    the lse in sorted order and log2 units (S_q, Nq).

    ``tiles``: (BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward kernel instead
    of the tuned choice (for ``benchmarks/tune_kernels.py``; None: tuned). ``tma``:
    load tiles through TMA descriptors (True), block loads (False), or the tuned
    choice (None)."""
    _check_head_dim(plan.D)
    B, Nq, H, D = q.shape
    Nk, Hkv = k.shape[1], k.shape[2]
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    bm, bn, warps, stages = _config(D, q.dtype, "fwd", tiles)
    tma = _use_tma(tma, "fwd", D, q.dtype, q.device)
    start, flo, fhi, end = _ranges(plan, bm, bn, transposed=False)
    qs, ks, vs = _gather(plan, q, k, v)
    o = torch.empty_like(q)
    lse = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
    lse_s = torch.empty((B * H, Nq), device=q.device, dtype=torch.float32)
    n_qblocks = triton.cdiv(Nq, bm)
    _fwd_kernel[(n_qblocks, B * H)](
        qs, ks, vs, *_descriptors(tma, (qs, bm), (ks, bn), (vs, bn)), o, lse, lse_s,
        plan.q_streams.index, plan.q_streams.key, plan.k_streams.key, start, flo, fhi, end,
        o.stride(0), o.stride(1), o.stride(2),
        H, Hkv, Nq, Nk, n_qblocks, plan.scale * _LOG2E,
        D=D, BLOCK_D=_block_d(D), BLOCK_M=bm, BLOCK_N=bn,
        CAUSAL=plan.causal, SHIFT=plan.shift, DOT_PREC=_dot_precision(q.dtype),
        TMA=tma, UPCAST=_INTERPRET and q.dtype == torch.bfloat16,
        num_warps=warps, num_stages=stages)
    return o, lse, lse_s


def triton_backward(do, dlse, q, k, v, o, lse, lse_s, plan: AttentionPlan, *,
                    dkdv_tiles=None, dq_tiles=None, tma=None):
    """(dq, dk, dv) of :func:`triton_forward`; ``dlse`` may be None.

    ``dkdv_tiles``, ``dq_tiles``: (BLOCK_M, BLOCK_N, num_warps, num_stages) of the
    dK/dV and dQ kernels instead of the tuned choices (tuning runs; None: tuned).
    ``tma``: TMA descriptor loads in both kernels (True), block loads (False), or
    the tuned choice per kernel (None)."""
    B, Nq, H, D = q.shape
    Nk, Hkv = k.shape[1], k.shape[2]
    q, k, v, do = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v, do))
    qs, ks, vs, dos, delta_s = _gather(plan, q, k, v, o, do, dlse)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    common = dict(D=D, BLOCK_D=_block_d(D), CAUSAL=plan.causal,
                  SHIFT=plan.shift, DOT_PREC=_dot_precision(q.dtype),
                  UPCAST=_INTERPRET and q.dtype == torch.bfloat16)
    qk_scale = plan.scale * _LOG2E
    sq = (plan.q_streams.key, plan.k_streams.key)

    bm, bn, warps, stages = _config(D, q.dtype, "dkdv", dkdv_tiles)
    use = _use_tma(tma, "dkdv", D, q.dtype, q.device)
    r = _ranges(plan, bm, bn, transposed=True)
    n_kblocks = triton.cdiv(Nk, bn)
    _bwd_dkdv_kernel[(n_kblocks, B * Hkv)](
        qs, ks, vs, dos, *_descriptors(use, (qs, bm), (ks, bn), (vs, bn), (dos, bm)),
        dk, dv, lse_s, delta_s, plan.k_streams.index, *sq, *r,
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        H, Hkv, Nq, Nk, n_kblocks, qk_scale, plan.scale,
        BLOCK_M=bm, BLOCK_N=bn, TMA=use, num_warps=warps, num_stages=stages, **common)

    bm, bn, warps, stages = _config(D, q.dtype, "dq", dq_tiles)
    use = _use_tma(tma, "dq", D, q.dtype, q.device)
    r = _ranges(plan, bm, bn, transposed=False)
    n_qblocks = triton.cdiv(Nq, bm)
    _bwd_dq_kernel[(n_qblocks, B * H)](
        qs, ks, vs, dos, *_descriptors(use, (qs, bm), (ks, bn), (vs, bn), (dos, bm)),
        dq, lse_s, delta_s, plan.q_streams.index, *sq, *r,
        dq.stride(0), dq.stride(1), dq.stride(2),
        H, Hkv, Nq, Nk, n_qblocks, qk_scale, plan.scale,
        BLOCK_M=bm, BLOCK_N=bn, TMA=use, num_warps=warps, num_stages=stages, **common)
    return dq, dk, dv


def forward_tiles(D: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of the forward kernel for head dim D and ``dtype``."""
    return _config(D, dtype, "fwd")[:2]


def tile_fraction(plan: AttentionPlan, bm: int = 128, bn: int = 64):
    """Computed tiles / all tiles, and the full (mask-free) share, at the forward blocks."""
    start, flo, fhi, end = _ranges(plan, bm, bn, transposed=False)
    n_q, n_k = triton.cdiv(plan.Nq, bm), triton.cdiv(plan.Nk, bn)
    live = int((end - start).sum())
    full = int((fhi - flo).sum())
    return {"live_tiles": live, "full_tiles": full,
            "all_tiles": plan.B * plan.H * n_q * n_k,
            "fraction": live / max(1, plan.B * plan.H * n_q * n_k)}
