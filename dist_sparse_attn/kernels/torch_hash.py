"""Angular LSH in PyTorch ops: the hash of ``hashing.lsh_scheme`` where the fused
Triton kernel (``triton_hash.py``) does not run (CPU tensors, ``torch.compile``
tracing).

The projections ``x R`` are computed in chunks of tokens, so thousands of buckets
do not need ``N x n_buckets`` memory; each factor of the scheme takes the first
maximal index over its block of rotation columns, and the sub-buckets combine in
mixed radix, h_1 most significant (then fine buckets merge where the scheme says so).
"""
from __future__ import annotations

import torch

_CHUNK_FLOATS = 1 << 26         # projections of one chunk of tokens: ~64M floats


def lsh_torch(x: torch.Tensor, rot: torch.Tensor, scheme, group_size: int) -> torch.Tensor:
    """Buckets (B, N, heads) int64 of x (B, N, heads, D) with rotations ``rot``
    (heads // group_size, D, C) float32 on x's device; head h uses rotation
    h // group_size."""
    B, N, Hx, D = x.shape
    rot = rot.repeat_interleave(group_size, 0)                               # (heads, D, C)
    step = max(1, _CHUNK_FLOATS // max(1, B * Hx * scheme.n_columns))
    out = torch.empty(B, N, Hx, dtype=torch.int64, device=x.device)
    for s in range(0, N, step):
        xr = torch.einsum("bnhd,hdc->bnhc", x[:, s:s + step].float(), rot)   # (B, n, heads, C)
        out[:, s:s + step] = buckets_of_projections(xr, scheme)
    return out                                                               # (B, N, heads)


def buckets_of_projections(xr: torch.Tensor, scheme) -> torch.Tensor:
    """Buckets (...) int64 from projections xr (..., C) on the scheme's rotation columns."""
    bucket = None
    for f, c0, c, signed in scheme.blocks:
        p = xr[..., c0:c0 + c]
        if signed:
            # argmax over [p ; -p] without building it: the larger of max(p) and max(-p),
            # the + half on a tie (the first maximal index)
            mx, imx = p.max(dim=-1)
            mn, imn = p.min(dim=-1)
            sub = torch.where(mx >= -mn, imx, imn + c)
        else:
            sub = p.argmax(dim=-1)
        bucket = sub if bucket is None else bucket * f + sub
    if scheme.merge:
        bucket = merge_fine_buckets(bucket, scheme.n_buckets, scheme.merge)
    return bucket


def merge_fine_buckets(fine, n_buckets: int, m: int):
    """``fine * n_buckets // m`` for fine in [0, m), m a power of two <= 2**36 and
    n_buckets < 2**31, without int64 overflow: split fine = hi * 2**s + lo, then
    ``(hi * n + (lo * n >> s)) >> (log2 m - s)`` (floor of a floor quotient)."""
    bits = m.bit_length() - 1
    s = bits // 2
    return ((fine >> s) * n_buckets + (((fine & ((1 << s) - 1)) * n_buckets) >> s)) >> (bits - s)
