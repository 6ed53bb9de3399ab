"""Public functional API: bucketed, hash-sparse and QK-sparse attention.

Layers: input validation -> plan (sort by bucket/position) -> autograd
Function -> backend (Triton kernels on CUDA, tiled PyTorch elsewhere).
"""
from __future__ import annotations

import os

import torch

from . import _validation as V
from .hashing import keep_to_buckets, lsh_buckets
from .plan import AttentionPlan, make_plan


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _backend_impl(backend: str, device: torch.device):
    """(forward, backward) callables of the chosen backend."""
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    if backend == "torch":
        from .kernels.torch_tiled import tiled_backward, tiled_forward
        return tiled_forward, tiled_backward
    if device.type != "cuda" and not _interpreting():
        raise ValueError(f"backend='triton' needs CUDA tensors (got device {device}) or "
                         "TRITON_INTERPRET=1 set before dist_sparse_attn is imported")
    from .kernels import triton_attn
    return triton_attn.triton_forward, triton_attn.triton_backward


class BucketedAttentionFunction(torch.autograd.Function):
    """o, lse = attention(q, k, v | plan); gradients for q, k, v (and through lse)."""

    @staticmethod
    def forward(ctx, q, k, v, plan: AttentionPlan, impl):
        fwd, _ = impl
        o, lse, aux = fwd(q, k, v, plan)      # aux: what the backend's backward needs
        ctx.save_for_backward(q, k, v, o, lse, aux)
        ctx.plan, ctx.impl = plan, impl
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, aux = ctx.saved_tensors
        _, bwd = ctx.impl
        dq, dk, dv = bwd(do.contiguous(), dlse, q, k, v, o, lse, aux, ctx.plan)
        return dq, dk, dv, None, None


def bucketed_attention(q, k, v, q_buckets, k_buckets, *, q_positions=None,
                       k_positions=None, causal=True, include_self=True,
                       softmax_scale=None, return_lse=False, backend="auto"):
    """Attention restricted to pairs that share a bucket, causal by position.

    Args:
        q: (B, Nq, H, D) float16/bfloat16/float32/float64.
        k, v: (B, Nk, Hkv, D), with H % Hkv == 0 (GQA/MQA).
        q_buckets: (B, Nq, H) integer; a negative bucket drops the query (output 0).
        k_buckets: (B, Nk, Hkv) integer; a negative bucket drops the key.
        q_positions, k_positions: (N,) or (B, N) integer original positions,
            default ``arange(N)``; causality compares these.
        causal: key j is allowed for query i only if pos_k[j] <= pos_q[i]
            (``<`` when ``include_self=False``).
        softmax_scale: default 1 / sqrt(D).
        return_lse: also return lse (B, H, Nq) float32 (-inf for empty rows).
        backend: "auto" (Triton on CUDA, PyTorch elsewhere), "triton", "torch".

    Returns:
        o (B, Nq, H, D) in q's dtype, or (o, lse).
    """
    V.check_backend(backend)
    V.check_qkv(q, k, v)
    B, Nq, H, D = q.shape
    Nk, Hkv = k.shape[1], k.shape[2]
    V.check_buckets("q_buckets", q_buckets, B, Nq, H, q.device)
    V.check_buckets("k_buckets", k_buckets, B, Nk, Hkv, q.device)
    q_positions = V.normalize_positions("q_positions", q_positions, B, Nq, q.device)
    k_positions = V.normalize_positions("k_positions", k_positions, B, Nk, q.device)
    V.check_scale(softmax_scale)
    return _attention(q, k, v, q_buckets, k_buckets, q_positions, k_positions, causal=causal,
                      include_self=include_self, softmax_scale=softmax_scale,
                      return_lse=return_lse, backend=backend)


def _attention(q, k, v, q_buckets, k_buckets, q_positions, k_positions, *, causal,
               include_self, softmax_scale, return_lse, backend):
    """bucketed_attention on validated inputs (positions already (B, N) int64)."""
    impl = _backend_impl(backend, q.device)
    plan = make_plan(q, k, q_buckets, k_buckets, q_positions, k_positions, causal=causal,
                     include_self=include_self, softmax_scale=softmax_scale)
    o, lse = BucketedAttentionFunction.apply(q, k, v, plan, impl)
    return (o, lse) if return_lse else o


def _default_positions(q, k):
    B, Nq, Nk = q.shape[0], q.shape[1], k.shape[1]
    return (V.normalize_positions("q_positions", None, B, Nq, q.device),
            V.normalize_positions("k_positions", None, B, Nk, q.device))


def hash_sparse_attention(q, k, v, n_buckets, *, seed=0, causal=True, include_self=True,
                          softmax_scale=None, return_lse=False, backend="auto"):
    """Each query attends only to keys in its angular-LSH bucket.

    q (B, Nq, H, D); k, v (B, Nk, Hkv, D). Query head h is hashed with the
    rotation of its kv head h // (H // Hkv), so q and k share hyperplanes.
    Equals ``bucketed_attention(q, k, v, lsh_buckets(q, n, seed=seed,
    group_size=H // Hkv), lsh_buckets(k, n, seed=seed), ...)``.
    """
    V.check_backend(backend)
    V.check_qkv(q, k, v)
    V.check_n_buckets(n_buckets)
    V.check_scale(softmax_scale)
    g = q.shape[2] // k.shape[2]
    with torch.no_grad():
        qb = lsh_buckets(q, n_buckets, seed=seed, group_size=g)
        kb = lsh_buckets(k, n_buckets, seed=seed)
    # buckets made here are in range: skip their validation (no extra launches)
    return _attention(q, k, v, qb, kb, *_default_positions(q, k), causal=causal,
                      include_self=include_self, softmax_scale=softmax_scale,
                      return_lse=return_lse, backend=backend)


def qk_sparse_attention(q, k, v, q_keep, k_keep, *, causal=True, softmax_scale=None,
                        return_lse=False, backend="auto"):
    """Causal attention among kept queries and keys only (query/key dropping).

    q (B, Nq, H, D); k, v (B, Nk, Hkv, D); q_keep (B, Nq, H) bool;
    k_keep (B, Nk, Hkv) bool. Dropped queries output 0 (lse -inf) and dropped
    keys are never attended. Causality uses the original token positions.
    """
    V.check_backend(backend)
    V.check_qkv(q, k, v)
    B, Nq, H, _ = q.shape
    V.check_keep("q_keep", q_keep, B, Nq, H, q.device)
    V.check_keep("k_keep", k_keep, B, k.shape[1], k.shape[2], q.device)
    V.check_scale(softmax_scale)
    return _attention(q, k, v, keep_to_buckets(q_keep), keep_to_buckets(k_keep),
                      *_default_positions(q, k), causal=causal, include_self=True,
                      softmax_scale=softmax_scale, return_lse=return_lse, backend=backend)
