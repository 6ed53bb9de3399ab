"""The attention as ``torch.library`` custom ops, for ``torch.compile``.

Under ``torch.compile`` the public functions (``bucketed_attention``,
``hash_sparse_attention``, ``qk_sparse_attention``) dispatch here instead of
to the eager ``autograd.Function``: dynamo and AOTAutograd cannot trace
through the Triton kernels (nor through the plan, a Python object holding
sort indices), so the forward and the backward are each one opaque operator

    dist_sparse_attn::attn_fwd(q, k, v, q_key, k_key, causal, include_self,
        scale, backend) -> (o, lse, aux)
    dist_sparse_attn::attn_bwd(do, dlse, q, k, v, o, lse, aux, q_key, k_key,
        causal, include_self, scale, backend) -> (dq, dk, dv)

with fake (meta) implementations that give the shapes, dtypes and strides the
backends produce, and an autograd formula joining the two. ``q_key``, ``k_key``
are the unsorted stream keys (S, N) int64 of ``layout.bucket_keys`` (traced:
elementwise); the plan (their sort, through the backend) is built inside each
op, so the backward rebuilds it: one sort per stream, cheap next to the
attention itself. Eager calls keep the ``autograd.Function`` path, which
builds the plan once.

``backend`` is resolved before the op ("torch" or "triton", never "auto").
``aux`` is what the backend's backward needs besides ``lse``:

* torch: the lse in the compute dtype, (B, H, Nq), float64 for float64
  inputs, else float32 (then a copy of ``lse``: outputs of a custom op may not
  alias each other);
* triton: the lse in sorted order and log2 units, (B * H, Nq) float32.

(No ``from __future__ import annotations`` here: ``custom_op`` infers the
schemas from the annotations.)
"""
from typing import Optional

import torch

from . import kernels
from .plan import plan_from_streams


def _plan(backend, q, k, q_key, k_key, causal, include_self, scale):
    return plan_from_streams(q, k, backend.sort_keys(q_key), backend.sort_keys(k_key),
                             causal=causal, include_self=include_self, softmax_scale=scale)


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _last_dim_contiguous(x):
    """What the Triton wrappers pass their kernels (and allocate outputs like)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _transposed_empty(x, B, N, heads, D, dtype):
    """(B, N, heads, D) with the strides of ``plan.from_streams``: a (B, heads, N, D)
    buffer, transposed."""
    return x.new_empty((B, heads, N, D), dtype=dtype).transpose(1, 2)


# ---------------------------------------------------------------- forward

@torch.library.custom_op("dist_sparse_attn::attn_fwd", mutates_args=())
def attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_key: torch.Tensor,
             k_key: torch.Tensor, causal: bool, include_self: bool, scale: Optional[float],
             backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    be = kernels.select(backend, q.device, q.dtype)
    o, lse, aux = be.forward(q, k, v, _plan(be, q, k, q_key, k_key, causal, include_self,
                                            scale))
    if aux is lse or aux.untyped_storage().data_ptr() == lse.untyped_storage().data_ptr():
        aux = aux.clone()       # torch backend, float32 compute: aux == lse
    return o, lse, aux


@attn_fwd.register_fake
def _attn_fwd_fake(q, k, v, q_key, k_key, causal, include_self, scale, backend):
    B, Nq, H, D = q.shape
    lse = q.new_empty((B, H, Nq), dtype=torch.float32)
    if backend == "triton":
        o = torch.empty_like(_last_dim_contiguous(q))
        aux = q.new_empty((B * H, Nq), dtype=torch.float32)
    else:
        o = _transposed_empty(q, B, Nq, H, D, q.dtype)
        aux = q.new_empty((B, H, Nq), dtype=_compute_dtype(q.dtype))
    return o, lse, aux


# ---------------------------------------------------------------- backward

@torch.library.custom_op("dist_sparse_attn::attn_bwd", mutates_args=())
def attn_bwd(do: torch.Tensor, dlse: Optional[torch.Tensor], q: torch.Tensor,
             k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
             aux: torch.Tensor, q_key: torch.Tensor, k_key: torch.Tensor, causal: bool,
             include_self: bool, scale: Optional[float],
             backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    be = kernels.select(backend, q.device, q.dtype)
    return be.backward(do.contiguous(), dlse, q, k, v, o, lse, aux,
                       _plan(be, q, k, q_key, k_key, causal, include_self, scale))


@attn_bwd.register_fake
def _attn_bwd_fake(do, dlse, q, k, v, o, lse, aux, q_key, k_key, causal, include_self,
                   scale, backend):
    if backend == "triton":
        return tuple(torch.empty_like(_last_dim_contiguous(x)) for x in (q, k, v))
    B, Nq, H, D = q.shape
    Nk, Hkv = k.shape[1], k.shape[2]
    return (_transposed_empty(q, B, Nq, H, D, q.dtype),
            _transposed_empty(k, B, Nk, Hkv, D, k.dtype),
            _transposed_empty(v, B, Nk, Hkv, D, v.dtype))


# ---------------------------------------------------------------- autograd

def _setup_context(ctx, inputs, output):
    q, k, v, q_key, k_key, causal, include_self, scale, backend = inputs
    o, lse, aux = output
    ctx.mark_non_differentiable(aux)
    ctx.save_for_backward(q, k, v, o, lse, aux, q_key, k_key)
    ctx.causal, ctx.include_self, ctx.scale, ctx.backend = causal, include_self, scale, backend


def _backward(ctx, do, dlse, daux):
    q, k, v, o, lse, aux, q_key, k_key = ctx.saved_tensors
    if do is None:              # only lse was used
        do = torch.zeros_like(o)
    # dlse None: lse unused (zeros would give the same gradients)
    dq, dk, dv = attn_bwd(do, dlse, q, k, v, o, lse, aux, q_key, k_key, ctx.causal,
                          ctx.include_self, ctx.scale, ctx.backend)
    return dq, dk, dv, None, None, None, None, None, None


attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def attention(q, k, v, q_key, k_key, *, causal, include_self, softmax_scale, backend):
    """(o, lse) of bucketed attention on validated inputs and their unsorted stream keys,
    through the custom ops."""
    backend = kernels.resolve(backend, q.device, q.dtype)
    scale = None if softmax_scale is None else float(softmax_scale)
    o, lse, _ = attn_fwd(q, k, v, q_key, k_key, bool(causal), bool(include_self), scale,
                         backend)
    return o, lse
