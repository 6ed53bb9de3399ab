"""Input checks at the public boundary: every error is a ValueError naming the argument."""
from __future__ import annotations

import numbers

import numpy as np
import torch

from ._index import arange

BACKENDS = ("auto", "torch", "triton")
_INT32_MAX = 2 ** 31 - 1
_WIDE_INTS = (torch.int32, torch.int64, torch.uint32, torch.uint64)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _desc(t):
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else f"type {type(t).__name__}"


def check_n_buckets(n_buckets):
    """Even, 2 .. 2**30: bucket ids (and the merged LSH scheme's int64 arithmetic)
    stay well below the drop sentinel 2**31 - 1 of ``layout.DROP``."""
    if isinstance(n_buckets, bool) or not isinstance(n_buckets, numbers.Integral) \
            or n_buckets < 2 or n_buckets % 2:
        raise ValueError(f"n_buckets must be an even integer >= 2, got {n_buckets!r}")
    if n_buckets > 2 ** 30:
        raise ValueError(f"n_buckets must be an even integer in [2, 2**30] (bucket ids stay "
                         f"below 2**31 - 1), got {n_buckets!r}")


def check_backend(backend):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check_qkv(q, k, v):
    """Shapes (B, Nq, H, D), (B, Nk, Hkv, D), (B, Nk, Hkv, D); same dtype/device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {_desc(t)}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, N, heads, D), got {_desc(t)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, "
                             f"got dtype {t.dtype}")
        if t.numel() == 0:
            raise ValueError(f"{name} must not be empty, got {_desc(t)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name}.dtype {t.dtype} differs from q.dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}.device {t.device} differs from q.device {q.device}")
    B, Nq, H, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k {_desc(k)} and v {_desc(v)} must have the same shape")
    if k.shape[0] != B:
        raise ValueError(f"batch size of k ({k.shape[0]}) differs from q ({B})")
    if k.shape[3] != D:
        raise ValueError(f"head dim of k/v ({k.shape[3]}) differs from q ({D})")
    Hkv = k.shape[2]
    if H % Hkv:
        raise ValueError(f"q heads ({H}) must be a multiple of k/v heads ({Hkv}) (GQA/MQA)")


def check_buckets(name, b, B, N, heads, device):
    if not isinstance(b, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {_desc(b)}")
    if b.dtype.is_floating_point or b.dtype.is_complex or b.dtype == torch.bool:
        raise ValueError(f"{name} must have an integer dtype, got {b.dtype}")
    if tuple(b.shape) != (B, N, heads):
        raise ValueError(f"{name} must have shape (B, N, heads) = {(B, N, heads)}, "
                         f"got {tuple(b.shape)}")
    if b.device != device:
        raise ValueError(f"{name}.device {b.device} differs from q.device {device}")
    if b.dtype in _WIDE_INTS:   # narrower types cannot reach the DROP sentinel
        _check_range(name, b, -(2 ** 63), _INT32_MAX - 1, "< 2**31 - 1")


def _check_range(name, t, lo, hi, what):
    """Value-range check without a host sync on accelerators (an async device
    assert there, an exact ValueError on the CPU). Under ``torch.compile`` the
    async assert also serves the CPU: reading values on the host would break
    the graph."""
    if t.numel() == 0:
        return
    unsigned = t.dtype in (torch.uint32, torch.uint64)
    if unsigned:
        # torch has no comparisons (nor min/max) of these on the CPU: check them as int64,
        # where a uint64 value past 2**63 - 1 wraps to a negative number (caught as such)
        t, lo = t.to(torch.int64), max(lo, 0)
    if t.device.type != "cpu" or torch.compiler.is_compiling():
        torch._assert_async(((t >= lo) & (t <= hi)).all(), f"{name} values must be {what}")
        return
    tmin, tmax = int(t.min()), int(t.max())
    if unsigned and tmin < 0:
        raise ValueError(f"{name} values must be {what}, got a value of 2**63 or more")
    if tmin < lo or tmax > hi:
        raise ValueError(f"{name} values must be {what}, got range [{tmin}, {tmax}]")


def check_keep(name, keep, B, N, heads, device):
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor, got "
                         f"{keep.dtype if isinstance(keep, torch.Tensor) else type(keep).__name__}")
    if tuple(keep.shape) != (B, N, heads):
        raise ValueError(f"{name} must have shape (B, N, heads) = {(B, N, heads)}, "
                         f"got {tuple(keep.shape)}")
    if keep.device != device:
        raise ValueError(f"{name}.device {keep.device} differs from q.device {device}")


def normalize_positions(name, pos, B, N, device):
    """None -> arange(N); (N,) or (B, N) integer -> (B, N) int64 on ``device``."""
    if pos is None:
        return arange(N, device).expand(B, N)
    if not isinstance(pos, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or None, got {_desc(pos)}")
    if pos.dtype.is_floating_point or pos.dtype.is_complex or pos.dtype == torch.bool:
        raise ValueError(f"{name} must have an integer dtype, got {pos.dtype}")
    if tuple(pos.shape) not in ((N,), (B, N)):
        raise ValueError(f"{name} must have shape (N,) = ({N},) or (B, N) = {(B, N)}, "
                         f"got {tuple(pos.shape)}")
    if pos.device != device:
        raise ValueError(f"{name}.device {pos.device} differs from q.device {device}")
    if pos.dtype in (torch.int64, torch.uint32, torch.uint64):   # int32 always fits
        _check_range(name, pos, -_INT32_MAX - 1, _INT32_MAX, "in [-2**31, 2**31 - 1] (int32)")
    pos = pos.to(torch.int64)
    return pos.expand(B, N) if pos.dim() == 1 else pos


def check_flags(**flags):
    """Every keyword must be a bool (``causal='no'`` or ``include_self=None`` would
    otherwise be read by truthiness)."""
    for name, value in flags.items():
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{name} must be True or False, got {value!r}")


def check_scale(softmax_scale):
    if softmax_scale is None:
        return
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real) \
            or not softmax_scale == softmax_scale or abs(softmax_scale) == float("inf"):
        raise ValueError(f"softmax_scale must be a finite number or None, got {softmax_scale!r}")
