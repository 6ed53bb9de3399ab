"""Bucketing: angular LSH bucket ids and QK keep-masks as bucket ids."""
from __future__ import annotations

import torch

from ._validation import check_n_buckets


def lsh_rotations(heads: int, dim: int, n_buckets: int, *, seed: int = 0,
                  group_size: int = 1) -> torch.Tensor:
    """The random rotations of :func:`lsh_buckets`, float32 (heads // group_size, D, n_buckets // 2).

    Drawn on the CPU from ``torch.Generator().manual_seed(seed)`` so every
    device and every rank obtains the same matrices.
    """
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn(heads // group_size, dim, n_buckets // 2, generator=gen,
                       dtype=torch.float32)


_ROTATIONS: dict = {}
_ROTATIONS_MAX = 4096     # entries of (heads/g, D, nb/2) floats: layers x devices x q/k


def _rotations_on(device, heads, dim, n_buckets, seed, group_size):
    """The rotations (heads // group_size, D, nb/2) on ``device``, drawn once
    (no host-device copy per call).

    A plain dict, not ``functools.lru_cache``: under ``torch.compile`` dynamo reads a
    cached entry as a constant tensor, where it would trace through an lru_cache into
    the CPU generator and break the graph (``GPTConfig.compile="model"`` draws every
    layer's rotations before compiling). Built outside inference mode, so a first call
    under ``torch.inference_mode()`` does not cache a tensor that autograd later refuses."""
    key = (str(device), heads, dim, n_buckets, seed, group_size)
    rot = _ROTATIONS.get(key)
    if rot is None:
        with torch.inference_mode(False):
            rot = lsh_rotations(heads, dim, n_buckets, seed=seed,
                                group_size=group_size).to(device)
        if len(_ROTATIONS) >= _ROTATIONS_MAX:       # evict the oldest entry (dicts keep order)
            del _ROTATIONS[next(iter(_ROTATIONS))]
        _ROTATIONS[key] = rot
    return rot


def _fused(x, n_buckets):
    """Use the fused Triton hashing kernel? On CUDA, for the shapes where it was
    measured fast on an H100 (head dim x half the buckets, padded, <= 2048; at
    D=128 with 64 buckets it ran ~20x slower than the PyTorch ops, presumably
    register spills). Both lsh_buckets and lsh_sort_keys decide here, so they
    always agree."""
    if not x.is_cuda or torch.compiler.is_compiling():
        # (under torch.compile the PyTorch ops trace; the raw kernel launch may not)
        return False
    bd = max(16, 1 << (x.shape[-1] - 1).bit_length())
    br = max(16, 1 << (n_buckets // 2 - 1).bit_length())
    return bd * br <= 2048


def _check_lsh_args(x, n_buckets, group_size):
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-D tensor (B, N, heads, D), got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got dtype {x.dtype}")
    check_n_buckets(n_buckets)
    if not isinstance(group_size, int) or group_size < 1 or x.shape[2] % group_size:
        raise ValueError(f"group_size must be a positive divisor of heads={x.shape[2]}, "
                         f"got {group_size!r}")


def lsh_sort_keys(x: torch.Tensor, n_buckets: int, *, seed: int = 0,
                  group_size: int = 1) -> torch.Tensor:
    """Sort keys (B * heads, N) int64 of ``layout.sort_streams`` for the LSH
    buckets of x at default positions, fused into one kernel on CUDA."""
    _check_lsh_args(x, n_buckets, group_size)
    B, N, Hx, D = x.shape
    if _fused(x, n_buckets):
        from .kernels.triton_hash import lsh_triton
        rot = _rotations_on(x.device, Hx, D, n_buckets, int(seed), group_size)
        return lsh_triton(x, rot, n_buckets, group_size, write_keys=True)
    from .layout import bucket_keys
    pos = torch.arange(N, device=x.device).expand(B, N)
    return bucket_keys(lsh_buckets(x, n_buckets, seed=seed, group_size=group_size), pos)


def lsh_buckets(x: torch.Tensor, n_buckets: int, *, seed: int = 0,
                group_size: int = 1) -> torch.Tensor:
    """Angular LSH bucket of every token and head: ``argmax([xR ; -xR])``.

    x: (B, N, heads, D) floating. Head ``h`` uses rotation ``h // group_size``
    (``heads // group_size`` rotations of shape (D, n_buckets / 2)).
    Returns (B, N, heads) int64 in ``[0, n_buckets)``. Invariant to positive
    scaling of x.
    """
    _check_lsh_args(x, n_buckets, group_size)
    B, N, Hx, D = x.shape
    rot = _rotations_on(x.device, Hx, D, n_buckets, int(seed), group_size)  # (Hx/g, D, nb/2)
    return _buckets_from_rotations(x, rot, n_buckets, group_size)


def _buckets_from_rotations(x, rot, n_buckets: int, group_size: int) -> torch.Tensor:
    """``argmax([xR ; -xR])`` with given rotations ``rot`` (heads // group_size, D, nb/2):
    the fused kernel on CUDA where it pays, else PyTorch ops in chunks of tokens."""
    B, N, Hx, D = x.shape
    if _fused(x, n_buckets):       # one launch, no float copy of x
        from .kernels.triton_hash import lsh_triton
        return lsh_triton(x, rot, n_buckets, group_size, write_keys=False)
    rot = rot.repeat_interleave(group_size, 0)                               # (heads, D, nb/2)
    # in chunks of tokens: the projections (chunk, heads, nb/2) stay below ~64M floats,
    # so thousands of buckets (fixed bucket size at 1M+ tokens) do not need N x nb memory
    step = max(1, (1 << 26) // max(1, B * Hx * n_buckets))
    out = torch.empty(B, N, Hx, dtype=torch.int64, device=x.device)
    for s in range(0, N, step):
        xr = torch.einsum("bnhd,hdr->bnhr", x[:, s:s + step].float(), rot)  # (B, n, heads, nb/2)
        # argmax over [xr ; -xr] without building it: the larger of max(xr) and max(-xr)
        mx, imx = xr.max(dim=-1)
        mn, imn = xr.min(dim=-1)
        out[:, s:s + step] = torch.where(mx >= -mn, imx, imn + n_buckets // 2)
    return out                                                               # (B, N, heads)


def keep_to_buckets(keep: torch.Tensor) -> torch.Tensor:
    """QK-sparse keep-mask (bool) -> bucket ids: kept tokens 0, dropped -1."""
    return torch.where(keep, 0, -1).to(torch.int64)
