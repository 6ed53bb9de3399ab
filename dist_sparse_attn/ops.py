"""Public functional API: bucketed, hash-sparse and QK-sparse attention.

Every public function is one chain, in this order:

    validation -> stream keys (S, N) int64 (layout.bucket_keys, or the hashing's keys)
        -> plan: the keys sorted through the backend (kernels.Backend.sort_keys)
        -> BucketedAttentionFunction (autograd) -> the backend's forward / backward

:func:`kernels.select <dist_sparse_attn.kernels.select>` picks the backend, which
implements every device step (hashing, sort, attention); nothing here tests for a
device. Under ``torch.compile`` tracing the last three steps are instead the custom
ops of :mod:`~dist_sparse_attn.compile_ops`, which build the plan inside.
"""
from __future__ import annotations

import torch

from . import _validation as V
from . import compile_ops
from . import kernels
from .hashing import keep_to_buckets, lsh_sort_keys
from .layout import bucket_keys
from .plan import AttentionPlan, plan_from_streams


class BucketedAttentionFunction(torch.autograd.Function):
    """o, lse = attention(q, k, v | plan) on a backend; gradients for q, k, v (and
    through lse)."""

    @staticmethod
    def forward(ctx, q, k, v, plan: AttentionPlan, backend: kernels.Backend):
        # the kernels compute in the inputs' dtype: an enclosing autocast must not recast
        # their inner matmuls (the tiled backend's would mix dtypes)
        with torch.autocast(q.device.type, enabled=False):
            o, lse, aux = backend.forward(q, k, v, plan)  # aux: what the backward needs
        ctx.save_for_backward(q, k, v, o, lse, aux)
        ctx.plan, ctx.backend = plan, backend
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, aux = ctx.saved_tensors
        with torch.autocast(q.device.type, enabled=False):
            dq, dk, dv = ctx.backend.backward(do.contiguous().to(o.dtype), dlse, q, k, v, o,
                                              lse, aux, ctx.plan)
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
    V.check_flags(causal=causal, include_self=include_self, return_lse=return_lse)
    return _attention(q, k, v, *_keys(q_buckets, k_buckets, q_positions, k_positions),
                      n_buckets=None, causal=causal, include_self=include_self,
                      softmax_scale=softmax_scale, return_lse=return_lse, backend=backend)


def _attention(q, k, v, q_key, k_key, *, n_buckets, causal, include_self, softmax_scale,
               return_lse, backend):
    """The chain every public function ends in, from validated inputs and unsorted
    stream keys (S_q, Nq), (S_k, Nk) int64 (:func:`~dist_sparse_attn.layout.bucket_keys`).

    ``n_buckets``: the caller's promise that every bucket of the keys is in
    ``[0, n_buckets)`` or dropped and positions are ``arange(N)`` (then the fused
    backend sorts by counting), or None (see ``kernels.Backend.sort_keys``)."""
    if torch.compiler.is_compiling():   # opaque custom ops: traceable, no graph break
        o, lse = compile_ops.attention(q, k, v, q_key, k_key, causal=causal,
                                       include_self=include_self,
                                       softmax_scale=softmax_scale, backend=backend)
    else:
        be = kernels.select(backend, q.device, q.dtype)
        with torch.no_grad():
            plan = plan_from_streams(q, k, be.sort_keys(q_key, n_buckets),
                                     be.sort_keys(k_key, n_buckets), causal=causal,
                                     include_self=include_self, softmax_scale=softmax_scale)
        o, lse = BucketedAttentionFunction.apply(q, k, v, plan, be)
    return (o, lse) if return_lse else o


def _default_positions(q, k):
    B, Nq, Nk = q.shape[0], q.shape[1], k.shape[1]
    return (V.normalize_positions("q_positions", None, B, Nq, q.device),
            V.normalize_positions("k_positions", None, B, Nk, q.device))


def _keys(q_buckets, k_buckets, q_positions, k_positions):
    """Unsorted stream keys of validated buckets and (B, N) int64 positions."""
    with torch.no_grad():
        return bucket_keys(q_buckets, q_positions), bucket_keys(k_buckets, k_positions)


def _bucketed_default_positions(q, k, v, q_buckets, k_buckets, n_buckets, *, causal=True,
                                include_self=True, softmax_scale=None, backend="auto"):
    """``bucketed_attention`` with default positions, for buckets the caller made (e.g.
    the model's LSH + block-local heads) and promises lie in [0, n_buckets) or are
    negative: no validation, and on the fused backend (CUDA) the stable counting sort
    instead of ``torch.sort`` (see ``kernels.Backend.sort_keys``).
    ``n_buckets=None``: no such promise (torch.sort; buckets must still be valid).
    The tensors' shapes, dtypes and devices are checked (no device sync)."""
    V.check_qkv(q, k, v)
    q_key, k_key = _keys(q_buckets, k_buckets, *_default_positions(q, k))
    return _attention(q, k, v, q_key, k_key, n_buckets=n_buckets, causal=causal,
                      include_self=include_self, softmax_scale=softmax_scale,
                      return_lse=False, backend=backend)


def hash_sparse_attention(q, k, v, n_buckets, *, seed=0, causal=True, include_self=True,
                          softmax_scale=None, return_lse=False, backend="auto"):
    """Each query attends only to keys in its angular-LSH bucket.

    q (B, Nq, H, D); k, v (B, Nk, Hkv, D). ``n_buckets``: even, 2 .. 2**30;
    ``seed``: integer in [0, 2**63). Query head h is hashed with the rotation of
    its kv head h // (H // Hkv), so q and k share hyperplanes. Equals
    ``bucketed_attention(q, k, v, lsh_buckets(q, n, seed=seed, group_size=H // Hkv),
    lsh_buckets(k, n, seed=seed), ...)``: for ``n_buckets <= 64`` one rotation,
    ``argmax([xR ; -xR])``; above, a product of small angular hashes, whose cost
    per token stays bounded as n_buckets grows (see :func:`~dist_sparse_attn.lsh_buckets`).
    """
    V.check_backend(backend)
    V.check_qkv(q, k, v)
    V.check_n_buckets(n_buckets)
    V.check_scale(softmax_scale)
    V.check_flags(causal=causal, include_self=include_self, return_lse=return_lse)
    g = q.shape[2] // k.shape[2]
    # the hashing writes the sort keys (one kernel per side on the fused backend); its
    # buckets are in [0, n_buckets) at positions arange(N): the promise that lets the
    # fused backend sort by counting (same result as torch.sort, fewer launches)
    with torch.no_grad():
        q_key = lsh_sort_keys(q, n_buckets, seed=seed, group_size=g)
        k_key = lsh_sort_keys(k, n_buckets, seed=seed)
    return _attention(q, k, v, q_key, k_key, n_buckets=n_buckets, causal=causal,
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
    V.check_flags(causal=causal, return_lse=return_lse)
    q_key, k_key = _keys(keep_to_buckets(q_keep), keep_to_buckets(k_keep),
                         *_default_positions(q, k))
    # kept tokens are bucket 0, dropped ones negative, at positions arange(N): the
    # promise of n_buckets=1, which lets the fused backend sort by counting
    return _attention(q, k, v, q_key, k_key, n_buckets=1, causal=causal,
                      include_self=True, softmax_scale=softmax_scale, return_lse=return_lse,
                      backend=backend)


def _check_cu_seqlens(name, cu, total, device):
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 2 \
            or cu.dtype.is_floating_point or cu.dtype == torch.bool:
        raise ValueError(f"{name} must be a 1-D integer tensor of length n_segments + 1, got "
                         f"{getattr(cu, 'shape', type(cu).__name__)}")
    if cu.device != device:
        raise ValueError(f"{name}.device {cu.device} differs from q.device {device}")
    c = cu.tolist()
    if c[0] != 0 or c[-1] != total or any(a > b for a, b in zip(c, c[1:])):
        raise ValueError(f"{name} must start at 0, be non-decreasing and end at the number "
                         f"of tokens ({total}), got {c if len(c) <= 8 else c[:4] + ['...']}")
    return cu.long()


def bucketed_attention_varlen(q, k, v, q_buckets, k_buckets, cu_seqlens_q, cu_seqlens_k, *,
                              q_positions=None, k_positions=None, causal=True,
                              include_self=True, softmax_scale=None, return_lse=False,
                              backend="auto"):
    """bucketed_attention over packed variable-length sequences.

    Args:
        q: (Tq, H, D); k, v: (Tk, Hkv, D): segments packed one after another.
        q_buckets: (Tq, H), k_buckets: (Tk, Hkv) integer (negative: dropped).
        cu_seqlens_q, cu_seqlens_k: (n_segments + 1,) integer offsets, starting
            at 0 and ending at Tq (Tk). Queries of segment s attend only keys of
            segment s.
        q_positions, k_positions: (T,) integer positions; default the index
            of each token within its segment.
    Returns o (Tq, H, D), or (o, lse (H, Tq) float32).

    Implemented by giving every segment its own range of bucket ids, so one
    sorted stream per head holds all segments and the kernels are unchanged.
    """
    V.check_backend(backend)
    for name, t, rank in (("q", q, 3), ("k", k, 3), ("v", v, 3)):
        if not isinstance(t, torch.Tensor) or t.dim() != rank:
            raise ValueError(f"{name} must be a 3-D tensor (T, heads, D) for varlen input, "
                             f"got {getattr(t, 'shape', type(t).__name__)}")
    V.check_qkv(q[None], k[None], v[None])
    Tq, H, _ = q.shape
    Tk, Hkv = k.shape[0], k.shape[1]
    V.check_buckets("q_buckets", q_buckets[None] if isinstance(q_buckets, torch.Tensor)
                    else q_buckets, 1, Tq, H, q.device)
    V.check_buckets("k_buckets", k_buckets[None] if isinstance(k_buckets, torch.Tensor)
                    else k_buckets, 1, Tk, Hkv, q.device)
    cq = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, Tq, q.device)
    ck = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, Tk, q.device)
    if cq.numel() != ck.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of "
                         f"segments, got {cq.numel() - 1} and {ck.numel() - 1}")
    V.check_scale(softmax_scale)
    V.check_flags(causal=causal, include_self=include_self, return_lse=return_lse)
    seg_q = torch.searchsorted(cq[1:], torch.arange(Tq, device=q.device), right=True)
    seg_k = torch.searchsorted(ck[1:], torch.arange(Tk, device=q.device), right=True)
    if q_positions is None:
        q_positions = torch.arange(Tq, device=q.device) - cq[seg_q]
    if k_positions is None:
        k_positions = torch.arange(Tk, device=q.device) - ck[seg_k]
    qpos = V.normalize_positions("q_positions", q_positions, 1, Tq, q.device)
    kpos = V.normalize_positions("k_positions", k_positions, 1, Tk, q.device)
    # segment s owns bucket ids [s * span, (s + 1) * span)
    span = int(max(q_buckets.max(), k_buckets.max(), 0)) + 1
    if (cq.numel() - 1) * span >= 2 ** 31 - 1:
        raise ValueError(f"too many segments ({cq.numel() - 1}) for bucket ids up to {span - 1}: "
                         "segment * bucket range must stay below 2**31 - 1")
    qb = torch.where(q_buckets < 0, -1, q_buckets.long() + seg_q[:, None] * span)
    kb = torch.where(k_buckets < 0, -1, k_buckets.long() + seg_k[:, None] * span)
    out = _attention(q[None], k[None], v[None], *_keys(qb[None], kb[None], qpos, kpos),
                     n_buckets=None, causal=causal, include_self=include_self,
                     softmax_scale=softmax_scale, return_lse=return_lse, backend=backend)
    if return_lse:
        return out[0][0], out[1][0]
    return out[0]
