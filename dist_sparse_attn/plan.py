"""The attention plan: everything about an attention call except q, k, v values.

Built once per call from buckets and positions (no gradients flow through it)
and shared by the forward and backward of every backend.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .layout import SortedStreams, sort_streams


@dataclass
class AttentionPlan:
    B: int
    Nq: int
    Nk: int
    H: int
    Hkv: int
    D: int
    q_streams: SortedStreams    # S_q = B * H streams of length Nq
    k_streams: SortedStreams    # S_k = B * Hkv streams of length Nk
    causal: bool
    include_self: bool
    scale: float
    cache: dict = field(default_factory=dict)   # backend metadata, e.g. block ranges per tile shape

    @property
    def kv_of_q(self) -> torch.Tensor:
        """(S_q,) int64, the kv stream each query stream reads (built on first use:
        the Triton kernels compute it themselves)."""
        if "kv_of_q" not in self.cache:
            s = torch.arange(self.B * self.H, device=self.q_streams.key.device)
            self.cache["kv_of_q"] = (s // self.H) * self.Hkv + (s % self.H) // self.group
        return self.cache["kv_of_q"]

    @property
    def group(self):
        return self.H // self.Hkv

    @property
    def shift(self):
        """allowed iff pos_k <= pos_q - shift (causal)."""
        return 0 if self.include_self else 1


def softmax_scale_for(D: int, softmax_scale) -> float:
    """The scale in use: ``softmax_scale``, or 1 / sqrt(D) when None."""
    return D ** -0.5 if softmax_scale is None else float(softmax_scale)


def make_plan(q, k, q_buckets, k_buckets, q_positions, k_positions, *, causal,
              include_self, softmax_scale):
    """q (B, Nq, H, D), k (B, Nk, Hkv, D); buckets (B, N, heads); positions (B, N) int64.
    Sorted with ``torch.sort`` (``layout.sort_streams``): for tests, benchmarks and
    tools; the library's calls sort through their backend (``kernels.Backend.sort_keys``)
    and use :func:`plan_from_streams`."""
    return plan_from_streams(q, k, sort_streams(q_buckets, q_positions),
                             sort_streams(k_buckets, k_positions), causal=causal,
                             include_self=include_self, softmax_scale=softmax_scale)


def plan_from_streams(q, k, q_streams: SortedStreams, k_streams: SortedStreams, *, causal,
                      include_self, softmax_scale):
    """The plan for already sorted streams (``kernels.Backend.sort_keys``)."""
    B, Nq, H, D = q.shape
    Nk, Hkv = k.shape[1], k.shape[2]
    return AttentionPlan(
        B=B, Nq=Nq, Nk=Nk, H=H, Hkv=Hkv, D=D,
        q_streams=q_streams, k_streams=k_streams, causal=bool(causal), include_self=bool(include_self),
        scale=softmax_scale_for(D, softmax_scale))


def to_streams(x: torch.Tensor, streams: SortedStreams) -> torch.Tensor:
    """(B, N, heads, D) -> sorted (S, N, D), S = B * heads."""
    B, N, heads, D = x.shape
    xs = x.transpose(1, 2).reshape(B * heads, N, D)
    return torch.gather(xs, 1, streams.index[..., None].expand(-1, -1, D))


def from_streams(xs: torch.Tensor, streams: SortedStreams, B: int) -> torch.Tensor:
    """Sorted (S, N, D) -> (B, N, heads, D), the inverse of :func:`to_streams`."""
    S, N, D = xs.shape
    out = torch.empty_like(xs).scatter_(1, streams.index[..., None].expand(-1, -1, D), xs)
    return out.view(B, S // B, N, D).transpose(1, 2)


def rows_from_streams(xs: torch.Tensor, streams: SortedStreams, B: int) -> torch.Tensor:
    """Sorted per-row values (S, N) -> (B, heads, N) in original token order."""
    S, N = xs.shape
    return torch.empty_like(xs).scatter_(1, streams.index, xs).view(B, S // B, N)


def rows_to_streams(x: torch.Tensor, streams: SortedStreams) -> torch.Tensor:
    """(B, heads, N) -> sorted (S, N)."""
    B, heads, N = x.shape
    return torch.gather(x.reshape(B * heads, N), 1, streams.index)
