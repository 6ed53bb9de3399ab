"""Sequence parallelism: each rank holds a contiguous slice of the sequence.

Strategies, one file each, all with the local op's arguments plus ``group``:

* ``"bucket"`` (:mod:`.bucket`): bucket-routed all-to-all (DESIGN §3); any head count.
* ``"ulysses"`` (:mod:`.ulysses`): heads all-to-all; the group size must divide H and Hkv.
"""
from __future__ import annotations

from . import _comm
from .bucket import bucket_parallel_attention
from .ulysses import ulysses_attention

STRATEGIES = {"bucket": bucket_parallel_attention, "ulysses": ulysses_attention}


def sequence_parallel_attention(q, k, v, q_buckets, k_buckets, *, group=None, strategy="bucket",
                                causal=True, include_self=True, softmax_scale=None,
                                backend="auto"):
    """Sequence-parallel ``bucketed_attention`` over a process group.

    Every rank of ``group`` calls this with its contiguous shard; ranks in group
    order hold consecutive slices, and shard lengths may differ between ranks
    (at least one token each). Global positions are global token indices, so
    causality is exact.

    Args:
        q: (B, n_r, H, D) this rank's shard; k, v: (B, n_r, Hkv, D), H % Hkv == 0.
        q_buckets: (B, n_r, H) integer, k_buckets: (B, n_r, Hkv) integer; a negative
            bucket drops the token (dropped queries output 0).
        group: a ``torch.distributed`` process group (None: the default group).
        strategy: "bucket" or "ulysses".
        causal, include_self, softmax_scale (default 1/sqrt(D)), backend: as in
            :func:`dist_sparse_attn.bucketed_attention`.

    Returns:
        o (B, n_r, H, D): this rank's shard of the single-device result.

    Raises ValueError on every rank of the group when any rank's inputs are
    invalid or B, H, Hkv, D, dtype, causal, include_self or strategy differ
    between ranks (checked with one small all_gather).
    """
    meta = _comm.validate_and_gather_meta(
        q, k, v, q_buckets, k_buckets, group=group, strategy=strategy, strategies=STRATEGIES,
        causal=causal, include_self=include_self, softmax_scale=softmax_scale, backend=backend)
    return STRATEGIES[strategy](q, k, v, q_buckets, k_buckets, group=group, causal=causal,
                                include_self=include_self, softmax_scale=softmax_scale,
                                backend=backend, _meta=meta)


__all__ = ["sequence_parallel_attention", "bucket_parallel_attention", "ulysses_attention"]
