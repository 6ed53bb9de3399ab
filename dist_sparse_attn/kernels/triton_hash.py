"""Fused angular LSH on GPUs: ``argmax([xR ; -xR])`` in one Triton kernel.

One program hashes a block of tokens of one (batch, head) stream: it reads the
rows once, projects them on the head's rotation (float32, IEEE dot), takes the
argmax over both signs and writes either the bucket ids (B, N, heads) or
directly the sort keys ``bucket << 32 | (pos + 2**31)`` of the stream layout
(S, N) that ``layout.sort_streams`` would build, saving the float copy, the
projection, the concatenation, the argmax and the key arithmetic as separate
launches. ``hashing.lsh_buckets`` uses this kernel for CUDA tensors, so
``hash_sparse_attention`` and ``bucketed_attention(lsh_buckets(...))`` see
identical buckets.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _lsh_kernel(X, R, OUT, stride_xb, stride_xn, stride_xh, heads, N, group,
                D: tl.constexpr, BLOCK_D: tl.constexpr, NB2: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, WRITE_KEY: tl.constexpr):
    pid_n = tl.program_id(0)
    sh = tl.program_id(1)                                           # stream b * heads + h
    b = sh // heads
    h = sh % heads
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    row_ok = rows < N
    x = tl.load(X + b.to(tl.int64) * stride_xb + h * stride_xh
                + rows.to(tl.int64)[:, None] * stride_xn + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)
    r = tl.load(R + (h // group) * (D * NB2) + offs_d[:, None] * NB2 + offs_r[None, :],
                mask=(offs_d[:, None] < D) & (offs_r[None, :] < NB2), other=0.0)
    xr = tl.dot(x, r, input_precision="ieee")                       # [BN, BR]
    col_ok = (offs_r < NB2)[None, :]
    pos_half = tl.where(col_ok, xr, float("-inf"))
    neg_half = tl.where(col_ok, -xr, float("-inf"))
    # first maximal index of [xR ; -xR], like torch.argmax: ties go to the + half
    best_pos = tl.max(pos_half, 1)
    best_neg = tl.max(neg_half, 1)
    bucket = tl.where(best_pos >= best_neg, tl.argmax(pos_half, 1),
                      NB2 + tl.argmax(neg_half, 1)).to(tl.int64)
    if WRITE_KEY:   # stream layout (S, N): bucket << 32 | (position + 2**31), position = row
        key = (bucket << 32) | (rows.to(tl.int64) + 2147483648)
        tl.store(OUT + sh.to(tl.int64) * N + rows, key, mask=row_ok)
    else:           # (B, N, heads)
        tl.store(OUT + (b.to(tl.int64) * N + rows) * heads + h, bucket, mask=row_ok)


def lsh_triton(x: torch.Tensor, rot: torch.Tensor, n_buckets: int, group_size: int,
               *, write_keys: bool) -> torch.Tensor:
    """x (B, N, heads, D); rot (heads // group_size, D, n_buckets // 2) float32.

    Returns buckets (B, N, heads) int64, or with ``write_keys`` the sort keys
    (B * heads, N) int64 for default positions ``arange(N)``.
    """
    B, N, heads, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    nb2 = n_buckets // 2
    out = torch.empty((B * heads, N) if write_keys else (B, N, heads), device=x.device,
                      dtype=torch.int64)
    block_n = 64
    _lsh_kernel[(triton.cdiv(N, block_n), B * heads)](
        x, rot.contiguous(), out, x.stride(0), x.stride(1), x.stride(2), heads, N, group_size,
        D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), NB2=nb2,
        BLOCK_R=max(16, triton.next_power_of_2(nb2)), BLOCK_N=block_n, WRITE_KEY=write_keys)
    return out
