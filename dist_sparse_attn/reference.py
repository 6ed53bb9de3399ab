"""Plain PyTorch oracle of the contract (docs/design.md, section 1): the semantics every
backend must match.

Materialises the full (B, H, Nq, Nk) score matrix, so use it for tests and
small inputs only. Differentiable through autograd.
"""
from __future__ import annotations

from typing import Optional

import torch


def allowed_mask(q_buckets, k_buckets, q_positions, k_positions, *, causal=True,
                 include_self=True, group_size=1):
    """Boolean (B, H, Nq, Nk) mask of allowed (query, key) pairs.

    q_buckets (B, Nq, H), k_buckets (B, Nk, Hkv) integer; positions (B, N) int64.
    Query head h reads kv head h // group_size.
    """
    qb = q_buckets.permute(0, 2, 1).long()                                   # (B, H, Nq)
    kb = k_buckets.permute(0, 2, 1).long().repeat_interleave(group_size, 1)  # (B, H, Nk)
    mask = (qb[..., :, None] == kb[..., None, :]) & (qb[..., :, None] >= 0)  # (B, H, Nq, Nk)
    if causal:
        qp = q_positions[:, None, :, None]                                   # (B, 1, Nq, 1)
        kp = k_positions[:, None, None, :]                                   # (B, 1, 1, Nk)
        mask = mask & ((kp <= qp) if include_self else (kp < qp))
    return mask


def reference_attention(q, k, v, q_buckets, k_buckets, *, q_positions=None,
                        k_positions=None, causal=True, include_self=True,
                        softmax_scale: Optional[float] = None, return_lse=False,
                        compute_dtype=torch.float64):
    """Bucketed causal attention computed densely in ``compute_dtype``.

    q (B, Nq, H, D); k, v (B, Nk, Hkv, D); q_buckets (B, Nq, H); k_buckets
    (B, Nk, Hkv); positions (N,) or (B, N), default ``arange(N)``.
    Returns o (B, Nq, H, D) in q's dtype, and lse (B, H, Nq) float32 if
    ``return_lse``. Rows with no allowed key give o = 0 and lse = -inf.
    """
    B, Nq, H, D = q.shape
    Nk, Hkv = k.shape[1], k.shape[2]
    q_positions = _positions(q_positions, B, Nq, q.device)
    k_positions = _positions(k_positions, B, Nk, q.device)
    scale = D ** -0.5 if softmax_scale is None else float(softmax_scale)
    g = H // Hkv
    mask = allowed_mask(q_buckets, k_buckets, q_positions, k_positions, causal=causal,
                        include_self=include_self, group_size=g)
    # dropped tokens' values are never read (0 x NaN would be NaN): zero them first
    q = q.masked_fill((q_buckets < 0)[..., None], 0)
    k, v = (x.masked_fill((k_buckets < 0)[..., None], 0) for x in (k, v))
    qc = q.to(compute_dtype).permute(0, 2, 1, 3)                              # (B, H, Nq, D)
    kc = k.to(compute_dtype).permute(0, 2, 1, 3).repeat_interleave(g, 1)      # (B, H, Nk, D)
    vc = v.to(compute_dtype).permute(0, 2, 1, 3).repeat_interleave(g, 1)      # (B, H, Nk, D)
    s = (qc @ kc.transpose(-1, -2)) * scale                                  # (B, H, Nq, Nk)
    s = s.masked_fill(~mask, float("-inf"))
    # Softmax is invariant to the shift, so the max carries no gradient.
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))               # empty rows: shift 0
    e = torch.exp(s - m)                                                     # masked -> exactly 0
    l = e.sum(-1, keepdim=True)
    p = e / torch.where(l > 0, l, torch.ones_like(l))                        # empty rows -> 0
    o = (p @ vc).permute(0, 2, 1, 3).to(q.dtype)                             # (B, Nq, H, D)
    if not return_lse:
        return o
    lse = (m + torch.log(l)).squeeze(-1).float()                             # log 0 = -inf
    return o, lse


def _positions(pos, B, N, device):
    if pos is None:
        return torch.arange(N, device=device).expand(B, N)
    pos = pos.to(device=device, dtype=torch.int64)
    return pos.expand(B, N) if pos.dim() == 1 else pos
