"""``nn.Module`` wrappers of the functional API, local and sequence-parallel.

Both modules hold no parameters: they take projected q, k, v (FlashAttention
layout) and return the attention output, so they drop in where a model calls
``flash_attn_func`` or ``scaled_dot_product_attention``.
"""
from __future__ import annotations

import torch
from torch import nn

from . import _validation as V
from .hashing import check_seed
from .ops import bucketed_attention, hash_sparse_attention, qk_sparse_attention
from .parallel import (STRATEGIES, sequence_parallel_attention, sequence_parallel_hash_attention,
                       sequence_parallel_qk_attention)
from .parallel._comm import check_overlap_chunks

MODES = ("hash", "qk", "dense", "bucketed")


def _check_mode(mode, n_buckets):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "hash":
        V.check_n_buckets(n_buckets)
    elif n_buckets is not None:
        raise ValueError(f"n_buckets is only used by mode='hash', got n_buckets={n_buckets!r} "
                         f"with mode={mode!r}")


def _forward_args(mode, q, k, q_keep, k_keep, q_buckets, k_buckets):
    """The per-call tensors each mode needs: (q_buckets, k_buckets) for 'dense' and
    'bucketed', (q_keep, k_keep) for 'qk', nothing for 'hash'."""
    needs = {"qk": ("q_keep", "k_keep"), "bucketed": ("q_buckets", "k_buckets")}.get(mode, ())
    given = {"q_keep": q_keep, "k_keep": k_keep, "q_buckets": q_buckets, "k_buckets": k_buckets}
    for name, value in given.items():
        if name in needs and value is None:
            raise ValueError(f"mode={mode!r} needs {name}")
        if name not in needs and value is not None:
            raise ValueError(f"mode={mode!r} takes no {name}")
    if mode == "dense":     # every token in bucket 0: causal (or full) dense attention
        return (torch.zeros(q.shape[:3], dtype=torch.int64, device=q.device),
                torch.zeros(k.shape[:3], dtype=torch.int64, device=q.device))
    if mode == "qk":
        return q_keep, k_keep
    return q_buckets, k_buckets


class SparseAttention(nn.Module):
    """Sparse causal attention on one device.

    Args:
        mode: "hash" (angular LSH buckets, ``n_buckets`` and ``seed``), "qk" (keep-masks
            passed to ``forward``), "dense" (every pair allowed, causal if ``causal``) or
            "bucketed" (bucket ids passed to ``forward``).
        n_buckets: number of LSH buckets (even), mode "hash" only.
        seed: seed of the LSH rotations (the same on every rank and device).
        causal, include_self, softmax_scale (default 1/sqrt(D)), backend: as in
            :func:`dist_sparse_attn.bucketed_attention` (mode "qk" always includes self).

    ``forward(q, k, v, q_keep=None, k_keep=None, *, q_buckets=None, k_buckets=None)``:
    q (B, N, H, D); k, v (B, N, Hkv, D); q_keep (B, N, H) / k_keep (B, N, Hkv) bool for
    mode "qk"; q_buckets (B, N, H) / k_buckets (B, N, Hkv) integer for mode "bucketed".
    Returns o (B, N, H, D).
    """

    def __init__(self, mode="hash", n_buckets=None, *, seed=0, causal=True, include_self=True,
                 softmax_scale=None, backend="auto"):
        super().__init__()
        _check_mode(mode, n_buckets)
        V.check_scale(softmax_scale)
        V.check_backend(backend)
        V.check_flags(causal=causal, include_self=include_self)
        if mode == "qk" and not include_self:
            raise ValueError("mode='qk' always includes self (include_self=True)")
        self.mode, self.n_buckets, self.seed = mode, n_buckets, check_seed(seed)
        self.causal, self.include_self = causal, include_self
        self.softmax_scale, self.backend = softmax_scale, backend

    # the functional ops behind each mode (the sequence-parallel subclass swaps them)
    _hash_fn = staticmethod(hash_sparse_attention)
    _qk_fn = staticmethod(qk_sparse_attention)
    _bucketed_fn = staticmethod(bucketed_attention)

    def _call_kwargs(self):
        return dict(causal=self.causal, softmax_scale=self.softmax_scale, backend=self.backend)

    def forward(self, q, k, v, q_keep=None, k_keep=None, *, q_buckets=None, k_buckets=None):
        kw = self._call_kwargs()
        if self.mode == "hash":
            _forward_args("hash", q, k, q_keep, k_keep, q_buckets, k_buckets)
            return self._hash_fn(q, k, v, self.n_buckets, seed=self.seed,
                                 include_self=self.include_self, **kw)
        a, b = _forward_args(self.mode, q, k, q_keep, k_keep, q_buckets, k_buckets)
        if self.mode == "qk":
            return self._qk_fn(q, k, v, a, b, **kw)
        return self._bucketed_fn(q, k, v, a, b, include_self=self.include_self, **kw)

    def extra_repr(self):
        nb = f", n_buckets={self.n_buckets}, seed={self.seed}" if self.mode == "hash" else ""
        return f"mode={self.mode!r}{nb}, causal={self.causal}, backend={self.backend!r}"


class SequenceParallelSparseAttention(SparseAttention):
    """Sparse causal attention over a sequence sharded across the ranks of ``group``.

    Args:
        group: the ``torch.distributed`` process group to shard over, passed explicitly
            (``None`` names the default group); the module keeps no global state.
        mode, n_buckets, seed, causal, include_self, softmax_scale, backend: as in
            :class:`SparseAttention`.
        strategy: "bucket", "ulysses" or "allgather" (see :mod:`dist_sparse_attn.parallel`).
            Default: "allgather" for modes "qk" and "dense" (each rank keeps its queries and
            gathers the kept keys; dense attention has no buckets to route by), "bucket"
            for "hash" and "bucketed".
        overlap_chunks: the bucket strategy's pipeline chunks (see
            :func:`~dist_sparse_attn.parallel.sequence_parallel_attention`).

    ``forward`` takes this rank's contiguous shard (ranks in group order hold
    consecutive slices; lengths may differ) with the arguments of
    :meth:`SparseAttention.forward` and returns this rank's shard of the
    single-device result. Every rank of the group must call it together.
    """

    _hash_fn = staticmethod(sequence_parallel_hash_attention)
    _qk_fn = staticmethod(sequence_parallel_qk_attention)
    _bucketed_fn = staticmethod(sequence_parallel_attention)

    def __init__(self, group, mode="hash", n_buckets=None, *, strategy=None, seed=0,
                 causal=True, include_self=True, softmax_scale=None, backend="auto",
                 overlap_chunks=1):
        super().__init__(mode, n_buckets, seed=seed, causal=causal, include_self=include_self,
                         softmax_scale=softmax_scale, backend=backend)
        if strategy is None:
            strategy = "allgather" if mode in ("qk", "dense") else "bucket"
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {tuple(STRATEGIES)}, got {strategy!r}")
        self.group, self.strategy = group, strategy
        self.overlap_chunks = check_overlap_chunks(overlap_chunks)

    def _call_kwargs(self):
        return dict(super()._call_kwargs(), group=self.group, strategy=self.strategy,
                    overlap_chunks=self.overlap_chunks)

    def extra_repr(self):
        return super().extra_repr() + f", strategy={self.strategy!r}"
