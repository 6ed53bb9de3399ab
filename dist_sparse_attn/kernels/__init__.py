"""Attention backends over the sorted layout: Triton kernels and a tiled PyTorch backend.

:func:`resolve` is the one place that decides which backend runs a call, and
:func:`implementation` returns its (forward, backward) pair; ``ops`` and
``compile_ops`` call these and nothing else decides.
"""
from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "torch", "triton")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """Triton's CPU interpreter is on (``TRITON_INTERPRET=1``, read when the kernels are
    defined, i.e. before ``dist_sparse_attn`` is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs a call: "torch" or "triton".

    "auto" is Triton for CUDA tensors of a dtype the kernels support (float16,
    bfloat16, float32) and the tiled PyTorch backend otherwise (CPU tensors, float64).
    An explicit "triton" that cannot run raises a ValueError naming the reason.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and dtype in TRITON_DTYPES else "torch"
    if backend == "triton":
        if device.type != "cuda" and not interpreting():
            raise ValueError(f"backend='triton' needs CUDA tensors (got device {device}) or "
                             "TRITON_INTERPRET=1 set before dist_sparse_attn is imported")
        if dtype not in TRITON_DTYPES:
            raise ValueError(f"backend='triton' supports float16, bfloat16 and float32, got "
                             f"dtype {dtype}; use backend='torch' (or 'auto') for {dtype}")
    return backend


def implementation(name: str):
    """(forward, backward) of a resolved backend ("torch" or "triton")."""
    if name == "torch":
        from .torch_tiled import tiled_backward, tiled_forward
        return tiled_forward, tiled_backward
    if name == "triton":
        from .triton_attn import triton_backward, triton_forward
        return triton_forward, triton_backward
    raise ValueError(f"backend must be 'torch' or 'triton' here, got {name!r}")
