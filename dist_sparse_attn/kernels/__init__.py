"""Backends: the attention kernels and the stream operations around them.

This package is the one place that decides what runs: nothing else in the
library tests for CUDA, for the Triton interpreter or for ``torch.compile``
tracing. :func:`select` returns a :class:`Backend`, and the layers above call
its steps:

    be = kernels.select(backend, device, dtype)
    be.name                                # "triton" or "torch": the attention kernels
    be.fused                               # the eager CUDA fast path (below)
    be.lsh(x, rotations, scheme, group_size, keys=False)   # LSH buckets or sort keys
    be.sort_keys(key, n_buckets=None)      # stable sort of stream keys -> SortedStreams
    be.forward(q, k, v, plan)              # -> o, lse, aux
    be.backward(do, dlse, q, k, v, o, lse, aux, plan)      # -> dq, dk, dv

Files: ``triton_attn.py`` (Triton attention), ``torch_tiled.py`` (tiled PyTorch
attention), ``triton_hash.py`` / ``torch_hash.py`` (angular LSH fused in Triton /
in PyTorch ops), ``triton_sort.py`` (stable counting sort of stream keys).

Kernels sit on :mod:`~dist_sparse_attn.layout` and :mod:`~dist_sparse_attn.plan`
(the sorted-stream dataclasses and block-range searches) and import nothing
else of the package; ``hashing``, ``ops`` and ``compile_ops`` call into them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .._index import arange
from ..layout import SortedStreams, bucket_keys, sort_keys as _torch_sort_keys

BACKENDS = ("auto", "torch", "triton")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """Triton's CPU interpreter is on (``TRITON_INTERPRET=1``, read when the kernels are
    defined, i.e. before ``dist_sparse_attn`` is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The attention kernels that run a call: "torch" or "triton".

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


def select(backend: str, device: torch.device, dtype: torch.dtype = torch.float32) -> "Backend":
    """The :class:`Backend` of a call on ``device`` with inputs of ``dtype``.

    ``name`` is :func:`resolve`'s choice; ``fused`` is True for CUDA tensors outside
    ``torch.compile`` tracing, whatever ``backend`` says, so that hashing (which has no
    backend argument) agrees between ``lsh_buckets`` and ``hash_sparse_attention``.
    """
    device = torch.device(device)
    return Backend(resolve(backend, device, dtype),
                   fused=device.type == "cuda" and not torch.compiler.is_compiling())


@dataclass(frozen=True)
class Backend:
    """The implementation of every device step of an attention call.

    ``name``: "triton" (the kernels of ``triton_attn.py``) or "torch" (the tiled
    backend of ``torch_tiled.py``) for the attention forward and backward.

    ``fused``: the fast path of eager CUDA calls. Hashing is one Triton kernel that
    writes the buckets or directly the sort keys, and the sort of keys whose buckets
    are promised in range is a Triton counting sort: a few launches and no host
    synchronisation. Without it, hashing and sorting are PyTorch ops (which
    ``torch.compile`` can trace). Both give the same buckets (up to float32 rounding of
    near-ties, summed in another order) and exactly the same sorted streams.
    :func:`select` sets it; tests may set it for CPU tensors under
    ``TRITON_INTERPRET=1``.
    """
    name: str
    fused: bool = False

    def __post_init__(self):
        if self.name not in ("torch", "triton"):
            raise ValueError(f"backend must be 'torch' or 'triton' here, got {self.name!r}")

    # ---------------------------------------------------------------- attention

    def forward(self, q, k, v, plan):
        """q (B, Nq, H, D), k, v (B, Nk, Hkv, D) and their plan -> o (B, Nq, H, D) in q's
        dtype, lse (B, H, Nq) float32, and ``aux``, what :meth:`backward` needs besides
        (torch: the lse in the compute dtype; triton: the lse in sorted order, log2 units,
        (B * H, Nq) float32)."""
        if self.name == "triton":
            from .triton_attn import triton_forward
            return triton_forward(q, k, v, plan)
        from .torch_tiled import tiled_forward
        return tiled_forward(q, k, v, plan)

    def backward(self, do, dlse, q, k, v, o, lse, aux, plan):
        """(dq, dk, dv) of :meth:`forward`, in the inputs' dtypes; ``dlse`` may be None."""
        if self.name == "triton":
            from .triton_attn import triton_backward
            return triton_backward(do, dlse, q, k, v, o, lse, aux, plan)
        from .torch_tiled import tiled_backward
        return tiled_backward(do, dlse, q, k, v, o, lse, aux, plan)

    # ---------------------------------------------------------------- streams

    def sort_keys(self, key: torch.Tensor, n_buckets: int | None = None) -> SortedStreams:
        """Stable sort of stream keys (S, N) int64 (``layout.bucket_keys``) -> SortedStreams.

        ``n_buckets`` is a promise from the caller: every bucket part is in
        ``[0, n_buckets)`` or DROP, and positions are non-decreasing along each stream
        (true of :meth:`lsh` keys, and of ``bucket_keys`` at the default positions
        ``arange(N)``). With it, a fused backend sorts by bucket alone with the Triton
        counting sort (``triton_sort.py``) where ``counting_sort_applies``; the result
        is the very same. Otherwise, or without the promise, ``torch.sort(stable=True)``.
        """
        if n_buckets is not None and self.fused and key.dim() == 2 \
                and key.dtype == torch.int64:
            from . import triton_sort
            if triton_sort.counting_sort_applies(key.shape[0], key.shape[1], n_buckets):
                key, index = triton_sort.bucket_sort_streams(key, n_buckets)
                return SortedStreams(index=index, key=key)
        return _torch_sort_keys(key)

    def lsh(self, x: torch.Tensor, rotations: torch.Tensor, scheme, group_size: int, *,
            keys: bool = False) -> torch.Tensor:
        """Angular LSH of x (B, N, heads, D) floating with ``rotations`` (heads //
        group_size, D, C) float32 on x's device, for an LSH scheme (``hashing.LSHScheme``:
        its ``blocks``, ``merge``, ``n_buckets`` and ``n_columns``).

        Returns the buckets (B, N, heads) int64 in ``[0, n_buckets)``, or with ``keys``
        the stream sort keys (B * heads, N) int64 of ``layout.bucket_keys`` at positions
        ``arange(N)``. Fused: one Triton kernel (``triton_hash.py``); otherwise PyTorch
        ops in chunks of tokens (``torch_hash.py``).
        """
        if self.fused:
            from .triton_hash import lsh_triton
            return lsh_triton(x, rotations, scheme, group_size, write_keys=keys)
        from .torch_hash import lsh_torch
        buckets = lsh_torch(x, rotations, scheme, group_size)              # (B, N, heads)
        if not keys:
            return buckets
        B, N = x.shape[:2]
        return bucket_keys(buckets, arange(N, x.device).expand(B, N))
