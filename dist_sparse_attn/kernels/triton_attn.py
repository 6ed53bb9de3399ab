"""Triton sparse flash attention over the sorted (bucket, position) layout.

Three kernels, forward and a parallel backward:

* ``_fwd_kernel``      one program per (query block, query stream)
* ``_bwd_dkdv_kernel`` one program per (key block, kv stream): dK, dV
* ``_bwd_dq_kernel``   one program per (query block, query stream): dQ

No tensor is permuted in memory: every program reads the rows of its block
through the sort index (``QIDX``/``KIDX``, original token numbers) straight
from the caller's (B, N, heads, D) tensors, and writes outputs and gradients
back to the same places. A program visits only the key (or query) blocks that
``layout.kv_ranges`` / ``layout.q_ranges`` found by binary search, in three
runs: partial blocks, *full* blocks (one shared bucket, wholly in the causal
past: no element mask at all), partial blocks again.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..plan import AttentionPlan
from . import interpreting

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
    """[len(idx), BLOCK_D] tile of rows ``idx`` (token numbers)."""
    ptrs = base + idx.to(tl.int64)[:, None] * stride_n + offs_d[None, :]
    return tl.load(ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _load_rows_t(base, idx, stride_n, offs_d, row_ok, D: tl.constexpr):
    """[BLOCK_D, len(idx)]: the transposed tile, loaded directly."""
    ptrs = base + idx.to(tl.int64)[None, :] * stride_n + offs_d[:, None]
    return tl.load(ptrs, mask=row_ok[None, :] & (offs_d[:, None] < D), other=0.0)


# --------------------------------------------------------------------------- #
# Forward
# --------------------------------------------------------------------------- #
@triton.jit
def _fwd_inner(acc, m_i, l_i, q, q_lo, q_hi,
               k_base, v_base, KIDX, KKEY, kv_row0, stride_kn, stride_vn,
               lo, hi, Nk, qk_scale,
               offs_n, offs_d,
               D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
               CAUSAL: tl.constexpr, SHIFT: tl.constexpr, DOT_PREC: tl.constexpr,
               UPCAST: tl.constexpr):
    for j in range(lo, hi):
        cols = j * BLOCK_N + offs_n                                   # [BN] sorted slots
        col_ok = cols < Nk
        kidx = tl.load(KIDX + kv_row0 + cols, mask=col_ok, other=0)
        kt = _load_rows_t(k_base, kidx, stride_kn, offs_d, col_ok, D)  # [BD, BN]
        if UPCAST:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale        # [BM, BN], log2 units
        if MASKED:
            kkey = tl.load(KKEY + kv_row0 + cols, mask=col_ok, other=9223372036854775807)
            s = tl.where(_allowed(q_lo, q_hi, kkey), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # rows with nothing allowed yet keep max -inf: shift by 0 instead
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new
        alpha = tl.exp2(m_i - m_use)                                  # [BM]
        p = tl.exp2(s - m_use[:, None])                               # [BM, BN]
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(v_base, kidx, stride_vn, offs_d, col_ok, D)    # [BN, BD]
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, LSE_S,
                QIDX, KIDX, QKEY, KKEY,
                R_START, R_FLO, R_FHI, R_END,
                stride_qb, stride_qn, stride_qh,
                stride_kb, stride_kn, stride_kh,
                stride_vb, stride_vn, stride_vh,
                stride_ob, stride_on, stride_oh,
                H, HKV, Nq, Nk, n_qblocks, qk_scale,
                D: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                CAUSAL: tl.constexpr, SHIFT: tl.constexpr, DOT_PREC: tl.constexpr,
                UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    s = tl.program_id(1)                                              # query stream b * H + h
    b = s // H
    h = s % H
    kvs = b * HKV + h // (H // HKV)                                   # its kv stream
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Nq
    q_row0 = s.to(tl.int64) * Nq
    kv_row0 = kvs.to(tl.int64) * Nk
    qidx = tl.load(QIDX + q_row0 + offs_m, mask=row_ok, other=0)
    q_lo, q_hi = _row_bounds(tl.load(QKEY + q_row0 + offs_m, mask=row_ok, other=9223372036854775807),
                             CAUSAL, SHIFT)
    q_base = Q + b.to(tl.int64) * stride_qb + h * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + (h // (H // HKV)) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + (h // (H // HKV)) * stride_vh
    q = _load_rows(q_base, qidx, stride_qn, offs_d, row_ok, D)        # [BM, BD]
    if UPCAST:      # the interpreter multiplies raw bf16 bits: compute in fp32
        q = q.to(tl.float32)

    r = s * n_qblocks + pid_m
    lo = tl.load(R_START + r)
    f_lo = tl.load(R_FLO + r)
    f_hi = tl.load(R_FHI + r)
    hi = tl.load(R_END + r)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # stage 1: partial blocks before the full run (bucket edge)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, q_lo, q_hi, k_base, v_base, KIDX, KKEY,
                               kv_row0, stride_kn, stride_vn, lo, f_lo, Nk, qk_scale,
                               offs_n, offs_d, D, BLOCK_N, True, CAUSAL, SHIFT, DOT_PREC, UPCAST)
    # stage 2: full blocks, no element mask
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, q_lo, q_hi, k_base, v_base, KIDX, KKEY,
                               kv_row0, stride_kn, stride_vn, f_lo, f_hi, Nk, qk_scale,
                               offs_n, offs_d, D, BLOCK_N, False, CAUSAL, SHIFT, DOT_PREC, UPCAST)
    # stage 3: partial blocks after it (causal diagonal, next bucket)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, q_lo, q_hi, k_base, v_base, KIDX, KKEY,
                               kv_row0, stride_kn, stride_vn, f_hi, hi, Nk, qk_scale,
                               offs_n, offs_d, D, BLOCK_N, True, CAUSAL, SHIFT, DOT_PREC, UPCAST)

    has = l_i > 0.0                                                   # rows with an allowed key
    o = acc / tl.where(has, l_i, 1.0)[:, None]                        # empty rows: 0
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))                                     # natural log units
    o_ptrs = O + b.to(tl.int64) * stride_ob + h * stride_oh \
        + qidx.to(tl.int64)[:, None] * stride_on + offs_d[None, :]
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))
    tl.store(LSE + q_row0 + qidx, lse, mask=row_ok)                   # (B, H, Nq) layout
    # for the backward: sorted order, log2 units, 0 for empty rows (all masked there)
    tl.store(LSE_S + q_row0 + offs_m, tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), 0.0),
             mask=row_ok)


# --------------------------------------------------------------------------- #
# Backward preprocess: delta = rowsum(dO * O) - dlse, in sorted order
# --------------------------------------------------------------------------- #
@triton.jit
def _bwd_preprocess(O, DO, DLSE, DELTA_S, QIDX,
                    stride_ob, stride_on, stride_oh,
                    stride_dob, stride_don, stride_doh,
                    H, Nq, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    HAS_DLSE: tl.constexpr):
    pid_m = tl.program_id(0)
    s = tl.program_id(1)
    b = s // H
    h = s % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Nq
    q_row0 = s.to(tl.int64) * Nq
    qidx = tl.load(QIDX + q_row0 + offs_m, mask=row_ok, other=0)
    o = _load_rows(O + b.to(tl.int64) * stride_ob + h * stride_oh, qidx, stride_on, offs_d,
                   row_ok, D).to(tl.float32)
    do = _load_rows(DO + b.to(tl.int64) * stride_dob + h * stride_doh, qidx, stride_don,
                    offs_d, row_ok, D).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:    # d lse_i / d s_ij = p_ij: folds into delta
        delta = delta - tl.load(DLSE + q_row0 + qidx, mask=row_ok, other=0.0)
    tl.store(DELTA_S + q_row0 + offs_m, delta, mask=row_ok)


# --------------------------------------------------------------------------- #
# Backward: dK, dV (one program per key block)
# --------------------------------------------------------------------------- #
@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, kkey,
                    q_base, do_base, LSE_S, DELTA_S, QIDX, QKEY,
                    q_row0, stride_qn, stride_don,
                    lo, hi, Nq, qk_scale,
                    offs_m, offs_d,
                    D: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
                    CAUSAL: tl.constexpr, SHIFT: tl.constexpr, DOT_PREC: tl.constexpr,
                    UPCAST: tl.constexpr):
    # Everything is computed transposed ([BN, BM]) so that no register tile
    # needs a layout transpose: S^T = K Q^T, dV += P^T dO, dK += dS^T Q.
    for i in range(lo, hi):
        rows = i * BLOCK_M + offs_m                                   # [BM] sorted slots
        row_ok = rows < Nq
        qidx = tl.load(QIDX + q_row0 + rows, mask=row_ok, other=0)
        qt = _load_rows_t(q_base, qidx, stride_qn, offs_d, row_ok, D)  # [BD, BM]
        do = _load_rows(do_base, qidx, stride_don, offs_d, row_ok, D)  # [BM, BD]
        if UPCAST:
            qt = qt.to(tl.float32)
            do = do.to(tl.float32)
        # lse (log2 units, 0 for empty rows) and delta, stored in sorted order
        lse = tl.load(LSE_S + q_row0 + rows, mask=row_ok, other=0.0)
        di = tl.load(DELTA_S + q_row0 + rows, mask=row_ok, other=0.0)
        st = tl.dot(k, qt, input_precision=DOT_PREC) * qk_scale       # [BN, BM]
        pt = tl.exp2(st - lse[None, :])
        if MASKED:
            q_lo, q_hi = _row_bounds(tl.load(QKEY + q_row0 + rows, mask=row_ok, other=9223372036854775807),
                                     CAUSAL, SHIFT)
            pt = tl.where(_allowed_t(kkey, q_lo, q_hi), pt, 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)       # [BN, BM]
        dst = pt * (dpt - di[None, :])
        # softmax scale applied once at the end
        dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE_S, DELTA_S,
                     QIDX, KIDX, QKEY, KKEY,
                     R_START, R_FLO, R_FHI, R_END,
                     stride_qb, stride_qn, stride_qh,
                     stride_kb, stride_kn, stride_kh,
                     stride_vb, stride_vn, stride_vh,
                     stride_dob, stride_don, stride_doh,
                     stride_dkb, stride_dkn, stride_dkh,
                     stride_dvb, stride_dvn, stride_dvh,
                     H, HKV, Nq, Nk, n_kblocks, qk_scale, sm_scale,
                     D: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     CAUSAL: tl.constexpr, SHIFT: tl.constexpr, DOT_PREC: tl.constexpr,
                     UPCAST: tl.constexpr):
    pid_n = tl.program_id(0)
    kvs = tl.program_id(1)                                            # kv stream b * HKV + hk
    b = kvs // HKV
    hk = kvs % HKV
    G = H // HKV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < Nk
    kv_row0 = kvs.to(tl.int64) * Nk
    kidx = tl.load(KIDX + kv_row0 + offs_n, mask=col_ok, other=0)
    kkey = tl.load(KKEY + kv_row0 + offs_n, mask=col_ok, other=9223372036854775807)
    k = _load_rows(K + b.to(tl.int64) * stride_kb + hk * stride_kh, kidx, stride_kn,
                   offs_d, col_ok, D)                                 # [BN, BD]
    v = _load_rows(V + b.to(tl.int64) * stride_vb + hk * stride_vh, kidx, stride_vn,
                   offs_d, col_ok, D)                                 # [BN, BD]
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(G):                                                # query heads of this kv head
        h = hk * G + g
        s = b * H + h
        q_row0 = s.to(tl.int64) * Nq
        q_base = Q + b.to(tl.int64) * stride_qb + h * stride_qh
        do_base = DO + b.to(tl.int64) * stride_dob + h * stride_doh
        r = s * n_kblocks + pid_n
        lo = tl.load(R_START + r)
        f_lo = tl.load(R_FLO + r)
        f_hi = tl.load(R_FHI + r)
        hi = tl.load(R_END + r)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, kkey, q_base, do_base, LSE_S, DELTA_S, QIDX,
                                 QKEY, q_row0, stride_qn, stride_don, lo, f_lo, Nq, qk_scale,
                                 offs_m, offs_d, D, BLOCK_M, True, CAUSAL, SHIFT, DOT_PREC,
                                 UPCAST)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, kkey, q_base, do_base, LSE_S, DELTA_S, QIDX,
                                 QKEY, q_row0, stride_qn, stride_don, f_lo, f_hi, Nq, qk_scale,
                                 offs_m, offs_d, D, BLOCK_M, False, CAUSAL, SHIFT, DOT_PREC,
                                 UPCAST)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, kkey, q_base, do_base, LSE_S, DELTA_S, QIDX,
                                 QKEY, q_row0, stride_qn, stride_don, f_hi, hi, Nq, qk_scale,
                                 offs_m, offs_d, D, BLOCK_M, True, CAUSAL, SHIFT, DOT_PREC,
                                 UPCAST)
    mask = col_ok[:, None] & (offs_d[None, :] < D)
    rows = kidx.to(tl.int64)[:, None]
    tl.store(DK + b.to(tl.int64) * stride_dkb + hk * stride_dkh + rows * stride_dkn
             + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + b.to(tl.int64) * stride_dvb + hk * stride_dvh + rows * stride_dvn
             + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- #
# Backward: dQ (one program per query block)
# --------------------------------------------------------------------------- #
@triton.jit
def _bwd_dq_inner(dq, q, do, lse, di, q_lo, q_hi,
                  k_base, v_base, KIDX, KKEY, kv_row0, stride_kn, stride_vn,
                  lo, hi, Nk, qk_scale, offs_n, offs_d,
                  D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                  CAUSAL: tl.constexpr, SHIFT: tl.constexpr, DOT_PREC: tl.constexpr,
                  UPCAST: tl.constexpr):
    for j in range(lo, hi):
        cols = j * BLOCK_N + offs_n
        col_ok = cols < Nk
        kidx = tl.load(KIDX + kv_row0 + cols, mask=col_ok, other=0)
        kt = _load_rows_t(k_base, kidx, stride_kn, offs_d, col_ok, D)  # [BD, BN]
        vt = _load_rows_t(v_base, kidx, stride_vn, offs_d, col_ok, D)  # [BD, BN]
        if UPCAST:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale        # [BM, BN]
        p = tl.exp2(s - lse[:, None])
        if MASKED:
            kkey = tl.load(KKEY + kv_row0 + cols, mask=col_ok, other=9223372036854775807)
            p = tl.where(_allowed(q_lo, q_hi, kkey), p, 0.0)
        dp = tl.dot(do, vt, input_precision=DOT_PREC)                 # [BM, BN]
        ds = p * (dp - di[:, None])
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=DOT_PREC)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE_S, DELTA_S,
                   QIDX, KIDX, QKEY, KKEY,
                   R_START, R_FLO, R_FHI, R_END,
                   stride_qb, stride_qn, stride_qh,
                   stride_kb, stride_kn, stride_kh,
                   stride_vb, stride_vn, stride_vh,
                   stride_dob, stride_don, stride_doh,
                   stride_dqb, stride_dqn, stride_dqh,
                   H, HKV, Nq, Nk, n_qblocks, qk_scale, sm_scale,
                   D: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, SHIFT: tl.constexpr, DOT_PREC: tl.constexpr,
                   UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    s = tl.program_id(1)
    b = s // H
    h = s % H
    hk = h // (H // HKV)
    kvs = b * HKV + hk
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Nq
    q_row0 = s.to(tl.int64) * Nq
    kv_row0 = kvs.to(tl.int64) * Nk
    qidx = tl.load(QIDX + q_row0 + offs_m, mask=row_ok, other=0)
    q_lo, q_hi = _row_bounds(tl.load(QKEY + q_row0 + offs_m, mask=row_ok, other=9223372036854775807),
                             CAUSAL, SHIFT)
    q = _load_rows(Q + b.to(tl.int64) * stride_qb + h * stride_qh, qidx, stride_qn,
                   offs_d, row_ok, D)
    do = _load_rows(DO + b.to(tl.int64) * stride_dob + h * stride_doh, qidx, stride_don,
                    offs_d, row_ok, D)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE_S + q_row0 + offs_m, mask=row_ok, other=0.0)   # sorted order
    di = tl.load(DELTA_S + q_row0 + offs_m, mask=row_ok, other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + hk * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk * stride_vh
    r = s * n_qblocks + pid_m
    lo = tl.load(R_START + r)
    f_lo = tl.load(R_FLO + r)
    f_hi = tl.load(R_FHI + r)
    hi = tl.load(R_END + r)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dq = _bwd_dq_inner(dq, q, do, lse, di, q_lo, q_hi, k_base, v_base, KIDX, KKEY, kv_row0,
                       stride_kn, stride_vn, lo, f_lo, Nk, qk_scale, offs_n, offs_d, D,
                       BLOCK_N, True, CAUSAL, SHIFT, DOT_PREC, UPCAST)
    dq = _bwd_dq_inner(dq, q, do, lse, di, q_lo, q_hi, k_base, v_base, KIDX, KKEY, kv_row0,
                       stride_kn, stride_vn, f_lo, f_hi, Nk, qk_scale, offs_n, offs_d, D,
                       BLOCK_N, False, CAUSAL, SHIFT, DOT_PREC, UPCAST)
    dq = _bwd_dq_inner(dq, q, do, lse, di, q_lo, q_hi, k_base, v_base, KIDX, KKEY, kv_row0,
                       stride_kn, stride_vn, f_hi, hi, Nk, qk_scale, offs_n, offs_d, D,
                       BLOCK_N, True, CAUSAL, SHIFT, DOT_PREC, UPCAST)
    tl.store(DQ + b.to(tl.int64) * stride_dqb + h * stride_dqh
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
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel; tuned on H100 for bf16/fp16.
    ``tiles``: the caller's choice instead (tuning runs)."""
    if tiles is not None:
        return _check_tiles(tiles, kind)
    big = dtype == torch.float32 or D > 128
    if _INTERPRET:
        return 32, 32, 4, 1
    if dtype == torch.float32 and D > 128:
        # float32 rows wider than 128 in 64-row tiles spill registers so heavily that
        # compiling the kernel did not finish in 5 minutes (H200, Triton 3.6)
        return 32, 32, 8, 1
    # measured on H100, bf16, D=64, B=2, H=16, N=16k (benchmarks/tune_kernels.py);
    # fwd and dq share a tile shape, so they share one set of block ranges
    if kind == "dkdv":
        return (32, 64, 4, 2) if big else (32, 64, 4, 3)
    return (64, 64, 4, 2) if big else (64, 64, 4, 3)                   # fwd, dq


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


def _stream_index(plan: AttentionPlan):
    """Sort indices (int64 token numbers) of the query and key streams."""
    return plan.q_streams.index, plan.k_streams.index


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


def triton_forward(q, k, v, plan: AttentionPlan, *, tiles=None):
    """o (B, Nq, H, D) in q.dtype, lse (B, H, Nq) float32, and for the backward
    the lse in sorted order and log2 units (S_q, Nq).

    ``tiles``: (BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward kernel instead
    of the tuned choice (for ``benchmarks/tune_kernels.py``; None: tuned)."""
    _check_head_dim(plan.D)
    B, Nq, H, D = q.shape
    Nk, Hkv = k.shape[1], k.shape[2]
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    bm, bn, warps, stages = _config(D, q.dtype, "fwd", tiles)
    qidx, kidx = _stream_index(plan)
    start, flo, fhi, end = _ranges(plan, bm, bn, transposed=False)
    o = torch.empty_like(q)
    lse = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
    lse_s = torch.empty((B * H, Nq), device=q.device, dtype=torch.float32)
    n_qblocks = triton.cdiv(Nq, bm)
    _fwd_kernel[(n_qblocks, B * H)](
        q, k, v, o, lse, lse_s, qidx, kidx,
        plan.q_streams.key, plan.k_streams.key, start, flo, fhi, end,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        H, Hkv, Nq, Nk, n_qblocks, plan.scale * _LOG2E,
        D=D, BLOCK_D=_block_d(D), BLOCK_M=bm, BLOCK_N=bn,
        CAUSAL=plan.causal, SHIFT=plan.shift, DOT_PREC=_dot_precision(q.dtype),
        UPCAST=_INTERPRET and q.dtype == torch.bfloat16,
        num_warps=warps, num_stages=stages)
    return o, lse, lse_s


def triton_backward(do, dlse, q, k, v, o, lse, lse_s, plan: AttentionPlan, *,
                    dkdv_tiles=None, dq_tiles=None):
    """(dq, dk, dv) of :func:`triton_forward`; ``dlse`` may be None.

    ``dkdv_tiles``, ``dq_tiles``: (BLOCK_M, BLOCK_N, num_warps, num_stages) of the
    dK/dV and dQ kernels instead of the tuned choices (tuning runs; None: tuned)."""
    B, Nq, H, D = q.shape
    Nk, Hkv = k.shape[1], k.shape[2]
    q, k, v, do = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v, do))
    qidx, kidx = _stream_index(plan)
    # delta_i = rowsum(dO_i * O_i) - dlse_i, in sorted order (S_q, Nq) float32
    delta_s = torch.empty((B * H, Nq), device=q.device, dtype=torch.float32)
    dlse_c = dlse.float().contiguous() if dlse is not None else delta_s
    bm_pre = 32 if _INTERPRET else 128
    _bwd_preprocess[(triton.cdiv(Nq, bm_pre), B * H)](
        o, do, dlse_c, delta_s, qidx, o.stride(0), o.stride(1), o.stride(2),
        do.stride(0), do.stride(1), do.stride(2), H, Nq, D=D, BLOCK_D=_block_d(D),
        BLOCK_M=bm_pre, HAS_DLSE=dlse is not None)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    common = dict(D=D, BLOCK_D=_block_d(D), CAUSAL=plan.causal,
                  SHIFT=plan.shift, DOT_PREC=_dot_precision(q.dtype),
                  UPCAST=_INTERPRET and q.dtype == torch.bfloat16)
    qk_scale = plan.scale * _LOG2E
    sq = (plan.q_streams.key, plan.k_streams.key)

    bm, bn, warps, stages = _config(D, q.dtype, "dkdv", dkdv_tiles)
    r = _ranges(plan, bm, bn, transposed=True)
    n_kblocks = triton.cdiv(Nk, bn)
    _bwd_dkdv_kernel[(n_kblocks, B * Hkv)](
        q, k, v, do, dk, dv, lse_s, delta_s, qidx, kidx, *sq, *r,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        H, Hkv, Nq, Nk, n_kblocks, qk_scale, plan.scale,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **common)

    bm, bn, warps, stages = _config(D, q.dtype, "dq", dq_tiles)
    r = _ranges(plan, bm, bn, transposed=False)
    n_qblocks = triton.cdiv(Nq, bm)
    _bwd_dq_kernel[(n_qblocks, B * H)](
        q, k, v, do, dq, lse_s, delta_s, qidx, kidx, *sq, *r,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        H, Hkv, Nq, Nk, n_qblocks, qk_scale, plan.scale,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **common)
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
