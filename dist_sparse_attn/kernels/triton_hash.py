"""Fused angular LSH on GPUs: every scheme of ``hashing.lsh_scheme`` in one Triton kernel.

One program hashes a block of tokens of one (batch, head) stream. For each
factor of the scheme (one factor ``argmax([xR ; -xR])`` for the classic scheme)
it projects the rows on that factor's rotation columns, a tile of columns at a
time, keeps a running first maximum over the tiles, and combines the sub-buckets
in mixed radix (then merges fine buckets where the scheme says so). It writes
either the bucket ids (B, N, heads) or directly the sort keys
``bucket << 32 | (pos + 2**31)`` of the stream layout (S, N) that
``layout.bucket_keys`` would compute, saving the float copy, the projections, the
argmaxes and the key arithmetic as separate launches.

Projections, two paths, both of float32 accuracy:

* bfloat16 rows with D <= 128 on a GPU: tensor-core dots of the whole head dim in one
  bf16 tile against the float32 rotation split into three bf16 parts (hi + mid + lo,
  exact products, float32 accumulation; ``_sub_bucket_split``).
* otherwise float32 IEEE dots over (BLOCK_N, 16) row tiles and (16, 32) rotation
  tiles into a (BLOCK_N, 32) projection tile, accumulated over tiles of the head dim,
  so register use does not grow with the head dim or the bucket count (a dot over the
  whole head dim made the FMA lowering hold every row's K values: 255 registers and
  spills at D = 64 with 64-column factors).

The fused backend (``kernels.Backend.lsh``) runs this kernel for every CUDA tensor
outside ``torch.compile`` tracing, for ``hashing.lsh_buckets`` and
``hash_sparse_attention`` alike, so both see identical buckets.
"""
from __future__ import annotations

import functools
import types
from typing import Mapping

import torch
import triton
import triton.language as tl

MAX_FACTORS = 6             # merged scheme of 2**30 buckets: 2**33 fine = 32^3 * 64^3
_BLOCK_N = 64
_MAX_BLOCK_D = 16
_MAX_BLOCK_C = 32
_MAX_STREAMS = 65535        # CUDA grid dimension y


@triton.jit
def _running_first_max(xr, col_ok, c0, best_p, arg_p, best_n, arg_n, SIGNED: tl.constexpr):
    """Fold the columns c0 .. c0 + BLOCK_C of x R (xr, (BLOCK_N, BLOCK_C)) into the running
    first maximum of xR (best_p, arg_p) and, SIGNED, of -xR (best_n, arg_n). Tiles come in
    column order, so a later tile must be strictly larger; within a tile tl.argmax takes
    the first maximal index."""
    pos = tl.where(col_ok[None, :], xr, float("-inf"))
    m = tl.max(pos, 1)
    take = m > best_p
    arg_p = tl.where(take, tl.argmax(pos, 1).to(tl.int32) + c0, arg_p)
    best_p = tl.where(take, m, best_p)
    if SIGNED:
        neg = tl.where(col_ok[None, :], -xr, float("-inf"))
        m = tl.max(neg, 1)
        take = m > best_n
        arg_n = tl.where(take, tl.argmax(neg, 1).to(tl.int32) + c0, arg_n)
        best_n = tl.where(take, m, best_n)
    return best_p, arg_p, best_n, arg_n


@triton.jit
def _signed_index(best_p, arg_p, best_n, arg_n, NC: tl.constexpr, SIGNED: tl.constexpr):
    """The sub-bucket: arg_p, or (SIGNED) the index into [xR ; -xR], whose + half holds the
    lower indexes and so wins a tie."""
    sub = arg_p
    if SIGNED:
        sub = tl.where(best_p >= best_n, arg_p, NC + arg_n)
    return sub


@triton.jit
def _sub_bucket(x_rows, row_ok, x_tile, R_head, D: tl.constexpr, C: tl.constexpr,
                COL0: tl.constexpr, NC: tl.constexpr, SIGNED: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
                stride_xd):
    """One factor's sub-bucket (BLOCK_N,) int32: the first maximal index of
    [xR ; -xR] (SIGNED) or of xR, R the head's rotation columns COL0 .. COL0 + NC.

    x_rows: (BLOCK_N,) pointers to the rows; x_tile: the rows' (BLOCK_N, BLOCK_D)
    float32 tile when one tile covers D (else reloaded per D tile)."""
    offs_c = tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    best_p = tl.full([BLOCK_N], float("-inf"), tl.float32)
    arg_p = tl.zeros([BLOCK_N], tl.int32)
    best_n = tl.full([BLOCK_N], float("-inf"), tl.float32)
    arg_n = tl.zeros([BLOCK_N], tl.int32)
    for c0 in range(0, NC, BLOCK_C):
        cols = c0 + offs_c
        col_ok = cols < NC
        if D <= BLOCK_D:
            r = tl.load(R_head + offs_d[:, None] * C + (COL0 + cols)[None, :],
                        mask=(offs_d[:, None] < D) & col_ok[None, :], other=0.0)
            xr = tl.dot(x_tile, r, input_precision="ieee")                 # [BN, BC]
        else:
            xr = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + offs_d
                x = tl.load(x_rows[:, None] + d[None, :] * stride_xd,
                            mask=row_ok[:, None] & (d[None, :] < D), other=0.0).to(tl.float32)
                r = tl.load(R_head + d[:, None] * C + (COL0 + cols)[None, :],
                            mask=(d[:, None] < D) & col_ok[None, :], other=0.0)
                xr += tl.dot(x, r, input_precision="ieee")
        best_p, arg_p, best_n, arg_n = _running_first_max(xr, col_ok, c0, best_p, arg_p,
                                                          best_n, arg_n, SIGNED)
    return _signed_index(best_p, arg_p, best_n, arg_n, NC, SIGNED)


@triton.jit
def _sub_bucket_split(x_tile, R_head, part_stride, D: tl.constexpr, C: tl.constexpr,
                      COL0: tl.constexpr, NC: tl.constexpr, SIGNED: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr):
    """:func:`_sub_bucket` on the tensor cores, for bfloat16 rows: x_tile is the
    (BLOCK_N, BLOCK_D) bf16 tile of the rows (the whole head dim, exact), and the float32
    rotation columns are the sum of three bf16 parts (hi + mid + lo, 24 bits of mantissa
    together), so ``x R = x R_lo + x R_mid + x R_hi`` with exact bf16 products and float32
    accumulation: float32 accuracy at tensor-core speed (the IEEE float32 dot runs on the
    CUDA cores)."""
    offs_c = tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    best_p = tl.full([BLOCK_N], float("-inf"), tl.float32)
    arg_p = tl.zeros([BLOCK_N], tl.int32)
    best_n = tl.full([BLOCK_N], float("-inf"), tl.float32)
    arg_n = tl.zeros([BLOCK_N], tl.int32)
    for c0 in range(0, NC, BLOCK_C):
        cols = c0 + offs_c
        col_ok = cols < NC
        p_r = R_head + offs_d[:, None] * C + (COL0 + cols)[None, :]            # [BD, BC]
        m_r = (offs_d[:, None] < D) & col_ok[None, :]
        xr = tl.dot(x_tile, tl.load(p_r + 2 * part_stride, mask=m_r, other=0.0))   # lo
        xr = tl.dot(x_tile, tl.load(p_r + part_stride, mask=m_r, other=0.0), xr)   # mid
        xr = tl.dot(x_tile, tl.load(p_r, mask=m_r, other=0.0), xr)                 # hi
        best_p, arg_p, best_n, arg_n = _running_first_max(xr, col_ok, c0, best_p, arg_p,
                                                          best_n, arg_n, SIGNED)
    return _signed_index(best_p, arg_p, best_n, arg_n, NC, SIGNED)


@triton.jit
def _factor(x_rows, row_ok, x_tile, R_head, part_stride, D: tl.constexpr, C: tl.constexpr,
            COL0: tl.constexpr, NC: tl.constexpr, SIGNED: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, stride_xd, SPLIT: tl.constexpr):
    if SPLIT:
        sub = _sub_bucket_split(x_tile, R_head, part_stride, D, C, COL0, NC, SIGNED,
                                BLOCK_N, BLOCK_D, BLOCK_C)
    else:
        sub = _sub_bucket(x_rows, row_ok, x_tile, R_head, D, C, COL0, NC, SIGNED, BLOCK_N,
                          BLOCK_D, BLOCK_C, stride_xd)
    return sub


@triton.jit
def _lsh_kernel(X, R, OUT, stride_xb, stride_xn, stride_xh, stride_xd, heads, N, group,
                s_first, n_buckets, part_stride,
                D: tl.constexpr, C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                K: tl.constexpr,
                F1: tl.constexpr, O1: tl.constexpr, NC1: tl.constexpr, BC1: tl.constexpr,
                F2: tl.constexpr, O2: tl.constexpr, NC2: tl.constexpr, BC2: tl.constexpr,
                F3: tl.constexpr, O3: tl.constexpr, NC3: tl.constexpr, BC3: tl.constexpr,
                F4: tl.constexpr, O4: tl.constexpr, NC4: tl.constexpr, BC4: tl.constexpr,
                F5: tl.constexpr, O5: tl.constexpr, NC5: tl.constexpr, BC5: tl.constexpr,
                F6: tl.constexpr, O6: tl.constexpr, NC6: tl.constexpr, BC6: tl.constexpr,
                MERGE_BITS: tl.constexpr, WRITE_KEY: tl.constexpr, SPLIT: tl.constexpr):
    pid_n = tl.program_id(0)
    sh = s_first + tl.program_id(1)                                 # stream b * heads + h
    b = sh // heads
    h = sh % heads
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    x_rows = X + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh \
        + rows.to(tl.int64) * stride_xn                             # (BLOCK_N,) pointers
    R_head = R + (h // group).to(tl.int64) * (D * C)
    offs_d = tl.arange(0, BLOCK_D)
    if SPLIT:           # bf16 rows, the whole head dim in one tile, for the tensor cores
        x_tile = tl.load(x_rows[:, None] + offs_d[None, :] * stride_xd,
                         mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    elif D <= BLOCK_D:  # one tile of the head dim: load the rows once for every factor
        x_tile = tl.load(x_rows[:, None] + offs_d[None, :] * stride_xd,
                         mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)
    else:
        x_tile = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)          # unused
    # mixed radix, h_1 most significant; factor i is signed (both halves) when F_i is even
    bucket = _factor(x_rows, row_ok, x_tile, R_head, part_stride, D, C, O1, NC1, F1 % 2 == 0,
                         BLOCK_N, BLOCK_D, BC1, stride_xd, SPLIT).to(tl.int64)
    if K >= 2:
        bucket = bucket * F2 + _factor(x_rows, row_ok, x_tile, R_head, part_stride, D, C, O2, NC2,
                                           F2 % 2 == 0, BLOCK_N, BLOCK_D, BC2, stride_xd, SPLIT)
    if K >= 3:
        bucket = bucket * F3 + _factor(x_rows, row_ok, x_tile, R_head, part_stride, D, C, O3, NC3,
                                           F3 % 2 == 0, BLOCK_N, BLOCK_D, BC3, stride_xd, SPLIT)
    if K >= 4:
        bucket = bucket * F4 + _factor(x_rows, row_ok, x_tile, R_head, part_stride, D, C, O4, NC4,
                                           F4 % 2 == 0, BLOCK_N, BLOCK_D, BC4, stride_xd, SPLIT)
    if K >= 5:
        bucket = bucket * F5 + _factor(x_rows, row_ok, x_tile, R_head, part_stride, D, C, O5, NC5,
                                           F5 % 2 == 0, BLOCK_N, BLOCK_D, BC5, stride_xd, SPLIT)
    if K >= 6:
        bucket = bucket * F6 + _factor(x_rows, row_ok, x_tile, R_head, part_stride, D, C, O6, NC6,
                                           F6 % 2 == 0, BLOCK_N, BLOCK_D, BC6, stride_xd, SPLIT)
    if MERGE_BITS > 0:
        # fine * n_buckets // 2**MERGE_BITS without int64 overflow, as torch_hash.merge_fine_buckets
        S: tl.constexpr = MERGE_BITS // 2
        nb = n_buckets.to(tl.int64)
        bucket = ((bucket >> S) * nb + (((bucket & ((1 << S) - 1)) * nb) >> S)) \
            >> (MERGE_BITS - S)
    if WRITE_KEY:   # stream layout (S, N): bucket << 32 | (position + 2**31), position = row
        key = (bucket << 32) | (rows.to(tl.int64) + 2147483648)
        tl.store(OUT + sh.to(tl.int64) * N + rows, key, mask=row_ok)
    else:           # (B, N, heads)
        tl.store(OUT + (b.to(tl.int64) * N + rows) * heads + h, bucket, mask=row_ok)


_BLOCK_N_SPLIT = 128
_MAX_D_SPLIT = 128          # the split path keeps the whole head dim in one bf16 tile
_SPLITS: dict = {}


def _use_split(x: torch.Tensor, D: int) -> bool:
    """The tensor-core path: bfloat16 rows (exact in bf16, so the products are exact) of a
    head dim that fits one tile, on a GPU (the interpreter's bf16 dot is not exact)."""
    import os
    return x.dtype == torch.bfloat16 and x.is_cuda and D <= _MAX_D_SPLIT \
        and os.environ.get("TRITON_INTERPRET", "0") != "1"


def _split_bf16(rot: torch.Tensor) -> torch.Tensor:
    """(3, *rot.shape) bf16 hi, mid, lo with hi + mid + lo == rot to float32 accuracy
    (8 + 8 + 8 bits of mantissa), cached per rotation tensor (rotations are cached and
    reused for every call of a layer)."""
    key = (rot.data_ptr(), rot._version, tuple(rot.shape), rot.device)
    parts = _SPLITS.get(key)
    if parts is None:
        hi = rot.to(torch.bfloat16)
        mid = (rot - hi.float()).to(torch.bfloat16)
        lo = (rot - hi.float() - mid.float()).to(torch.bfloat16)
        parts = torch.stack([hi, mid, lo]).contiguous()
        if len(_SPLITS) >= 4096:
            del _SPLITS[next(iter(_SPLITS))]
        _SPLITS[key] = parts
    return parts


@functools.lru_cache(maxsize=256)
def _factor_args(scheme) -> Mapping:
    """Constexpr arguments of the scheme's factors (unused slots: factor 1, no columns);
    made once per scheme (a call's host time counts)."""
    args = {"K": len(scheme.factors)}
    blocks = list(scheme.blocks)
    if len(blocks) > MAX_FACTORS:
        raise ValueError(f"at most {MAX_FACTORS} factors, got {scheme.factors}")
    for i in range(MAX_FACTORS):
        f, c0, c, _ = blocks[i] if i < len(blocks) else (1, 0, 0, False)
        bc = min(_MAX_BLOCK_C, max(16, triton.next_power_of_2(max(c, 1))))
        args.update({f"F{i + 1}": f, f"O{i + 1}": c0, f"NC{i + 1}": c, f"BC{i + 1}": bc})
    return types.MappingProxyType(args)


def lsh_triton(x: torch.Tensor, rot: torch.Tensor, scheme, group_size: int,
               *, write_keys: bool) -> torch.Tensor:
    """x (B, N, heads, D) floating, any strides; rot (heads // group_size, D, C)
    float32, the rotations of ``hashing.lsh_rotations(heads, D, n_buckets, ...)``;
    ``scheme`` is ``hashing.lsh_scheme(n_buckets)``.

    Returns buckets (B, N, heads) int64, or with ``write_keys`` the sort keys
    (B * heads, N) int64 for default positions ``arange(N)``.
    """
    n_buckets = scheme.n_buckets
    B, N, heads, D = x.shape
    C = scheme.n_columns
    if tuple(rot.shape) != (heads // group_size, D, C) or rot.dtype != torch.float32:
        raise ValueError(f"rot must be float32 of shape {(heads // group_size, D, C)}, got "
                         f"{tuple(rot.shape)} {rot.dtype}")
    rot = rot.contiguous()
    split = _use_split(x, D)
    if split:       # (3, heads // g, D, C) bf16: hi, mid, lo with hi + mid + lo == rot
        rot = _split_bf16(rot)
    out = torch.empty((B * heads, N) if write_keys else (B, N, heads), device=x.device,
                      dtype=torch.int64)
    streams = B * heads
    if streams == 0 or N == 0:
        return out
    block_d = max(16, triton.next_power_of_2(D)) if split else \
        min(_MAX_BLOCK_D, max(16, triton.next_power_of_2(D)))
    block_n = _BLOCK_N_SPLIT if split else _BLOCK_N
    # ptxas for sm_90 (Triton 3.7), D 16..256: no spills; with 4 warps 37-128 registers
    # up to two factors, while three or more would reach 168-255 (spilling at five):
    # 8 warps bring those to 80-125 (255 at five factors, unspilled)
    warps = 4 if len(scheme.factors) <= 2 else 8
    merge_bits = scheme.merge.bit_length() - 1 if scheme.merge else 0
    for s0 in range(0, streams, _MAX_STREAMS):
        grid = (triton.cdiv(N, block_n), min(_MAX_STREAMS, streams - s0))
        _lsh_kernel[grid](
            x, rot, out, x.stride(0), x.stride(1), x.stride(2), x.stride(3), heads, N,
            group_size, s0, n_buckets, rot[0].numel() if split else 0, D=D, C=C,
            BLOCK_D=block_d, BLOCK_N=block_n, MERGE_BITS=merge_bits, WRITE_KEY=write_keys,
            SPLIT=split, num_warps=warps, **_factor_args(scheme))
    return out
