"""Sequence parallelism: each rank holds a contiguous slice of the sequence.

Strategies, one file each, all with the local op's arguments plus ``group``:

* ``"bucket"`` (:mod:`.bucket`): bucket-routed all-to-all (docs/design.md, section 3); any
  head count.
* ``"ulysses"`` (:mod:`.ulysses`): heads all-to-all; the group size must divide H and Hkv.
* ``"allgather"`` (:mod:`.allgather`): every rank gathers the compacted kept k/v
  items of all ranks (QK-sparse: the exchange shrinks with the drop rate).

Conveniences: :func:`sequence_parallel_hash_attention` (LSH buckets hashed
locally, the same rotations on every rank) and
:func:`sequence_parallel_qk_attention` (keep-masks).

:mod:`.routing` plans the bucket strategy (group owners, pipeline chunks, counts);
:mod:`._comm` holds the collectives and the agreement check every strategy runs
first. Every strategy computes its local attention inside the profiler range
``dist_sparse_attn::local_attention`` (``_comm.LOCAL_ATTENTION_RANGE``), so
``torch.profiler`` separates local compute from communication.

Failures and timeouts (multi-node)
----------------------------------
Every strategy runs blocking collectives of ``torch.distributed``; nothing
here adds a transport or a timeout of its own. A rank that dies or stalls is
detected by the process group:

* Set the timeout when the group is created:
  ``torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=...))``
  (or ``new_group(..., timeout=...)``; ``deepspeed.init_distributed(timeout=...)``).
  The default is 30 minutes for gloo and 10 minutes for NCCL.
* gloo: a collective whose peer has exited raises at once (connection closed
  by peer); one whose peer stalls raises ``RuntimeError``/``DistBackendError``
  once the timeout expires. The process group is unusable afterwards: end the
  process (``destroy_process_group`` may itself block on a dead peer).
* NCCL: collectives are asynchronous; a watchdog thread checks them against
  the timeout. ``TORCH_NCCL_ASYNC_ERROR_HANDLING`` says what happens then:
  1 = abort the communicators and tear the process down, 2 = abort only,
  3 = tear down without aborting (the default of recent torch), 0 = nothing.
  ``TORCH_NCCL_BLOCKING_WAIT=1`` makes the waiting call itself raise on a
  timeout instead. Set them in the environment before the group is created
  (in the launcher's environment for torchrun, deepspeed or mpirun).

``tests/parallel/test_sequence_parallel.py::test_failed_rank_raises_within_timeout``
makes one of three gloo ranks exit (or stall) before a collective and checks that the
others raise (at once, or after the 10 s timeout) instead of hanging.
"""
from __future__ import annotations

from .. import _validation as V
from ..hashing import keep_to_buckets, lsh_buckets
from . import _comm
from .allgather import allgather_attention
from .bucket import bucket_parallel_attention
from .ulysses import ulysses_attention

STRATEGIES = {"bucket": bucket_parallel_attention, "ulysses": ulysses_attention,
              "allgather": allgather_attention}


def sequence_parallel_attention(q, k, v, q_buckets, k_buckets, *, group=None, strategy="bucket",
                                causal=True, include_self=True, softmax_scale=None,
                                backend="auto", overlap_chunks=1):
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
        strategy: "bucket", "ulysses" or "allgather".
        causal, include_self, softmax_scale (default 1/sqrt(D)), backend: as in
            :func:`dist_sparse_attn.bucketed_attention`.
        overlap_chunks: the bucket strategy's pipeline chunks (an integer >= 1; the other
            strategies ignore it): 1 exchanges all rows at once; K > 1 splits every
            owner's groups into K chunks whose exchanges overlap the neighbouring
            chunk's kernel (see :mod:`.bucket`). The result is the same.

    Returns:
        o (B, n_r, H, D): this rank's shard of the single-device result.

    Raises ValueError on every rank of the group when any rank's inputs are invalid
    or an argument that must agree differs between ranks: B, H, Hkv, D, dtype, device
    type, causal, include_self, strategy, the softmax scale in use, the backend that
    runs, the bucket strategy's overlap chunks, whether the inputs need gradients (with
    gradients enabled: any of q, k, v requiring them; k or v for "allgather"), and
    n_buckets and seed for :func:`sequence_parallel_hash_attention`. Checked with one
    small all_gather.
    """
    return _dispatch(q, k, v, q_buckets, k_buckets, group=group, strategy=strategy,
                     causal=causal, include_self=include_self, softmax_scale=softmax_scale,
                     backend=backend, overlap_chunks=overlap_chunks)


def _dispatch(q, k, v, q_buckets, k_buckets, *, group, strategy, causal, include_self,
              softmax_scale, backend, overlap_chunks, mode="bucketed", n_buckets=None,
              seed=None, local_error=None):
    meta = _comm.validate_and_gather_meta(
        q, k, v, q_buckets, k_buckets, group=group, strategy=strategy, strategies=STRATEGIES,
        causal=causal, include_self=include_self, softmax_scale=softmax_scale, backend=backend,
        mode=mode, n_buckets=n_buckets, seed=seed, overlap_chunks=overlap_chunks,
        local_error=local_error)
    return STRATEGIES[strategy](q, k, v, q_buckets, k_buckets, group=group, causal=causal,
                                include_self=include_self, softmax_scale=softmax_scale,
                                backend=backend, _meta=meta)


def sequence_parallel_hash_attention(q, k, v, n_buckets, *, seed=0, group=None,
                                     strategy="bucket", causal=True, include_self=True,
                                     softmax_scale=None, backend="auto", overlap_chunks=1):
    """Sequence-parallel ``hash_sparse_attention``.

    q (B, n_r, H, D); k, v (B, n_r, Hkv, D): this rank's contiguous shard. Every
    rank hashes its own tokens with ``lsh_buckets(q, n_buckets, seed=seed,
    group_size=H // Hkv)`` and ``lsh_buckets(k, n_buckets, seed=seed)``: the
    rotations depend only on the seed, so all ranks use the same ones and the
    result equals the single-device ``hash_sparse_attention`` on the whole
    sequence. Other arguments as in :func:`sequence_parallel_attention`.
    """
    _comm.check_group(group)
    q_buckets = k_buckets = None
    error = None
    try:
        V.check_qkv(q, k, v)
        q_buckets = lsh_buckets(q.detach(), n_buckets, seed=seed,
                                group_size=q.shape[2] // k.shape[2])          # (B, n_r, H)
        k_buckets = lsh_buckets(k.detach(), n_buckets, seed=seed)             # (B, n_r, Hkv)
    except Exception as e:      # noqa: BLE001 -- raised on every rank after the gather
        error = e
    return _dispatch(q, k, v, q_buckets, k_buckets, group=group, strategy=strategy,
                     causal=causal, include_self=include_self, softmax_scale=softmax_scale,
                     backend=backend, overlap_chunks=overlap_chunks, mode="hash",
                     n_buckets=n_buckets, seed=seed, local_error=error)


def sequence_parallel_qk_attention(q, k, v, q_keep, k_keep, *, group=None,
                                   strategy="allgather", causal=True, softmax_scale=None,
                                   backend="auto", overlap_chunks=1):
    """Sequence-parallel ``qk_sparse_attention`` (query/key dropping).

    q (B, n_r, H, D); k, v (B, n_r, Hkv, D); q_keep (B, n_r, H) bool, k_keep
    (B, n_r, Hkv) bool: this rank's contiguous shard. Dropped queries output 0;
    dropped keys are never attended. The default strategy "allgather" sends
    only the kept keys. Other arguments as in :func:`sequence_parallel_attention`.
    """
    _comm.check_group(group)
    q_buckets = k_buckets = None
    error = None
    try:
        V.check_qkv(q, k, v)
        B, n, H, _ = q.shape
        V.check_keep("q_keep", q_keep, B, n, H, q.device)
        V.check_keep("k_keep", k_keep, B, k.shape[1], k.shape[2], q.device)
        q_buckets, k_buckets = keep_to_buckets(q_keep), keep_to_buckets(k_keep)
    except Exception as e:      # noqa: BLE001 -- raised on every rank after the gather
        error = e
    return _dispatch(q, k, v, q_buckets, k_buckets, group=group, strategy=strategy,
                     causal=causal, include_self=True, softmax_scale=softmax_scale,
                     backend=backend, overlap_chunks=overlap_chunks, mode="qk",
                     local_error=error)


__all__ = ["sequence_parallel_attention", "sequence_parallel_hash_attention",
           "sequence_parallel_qk_attention", "bucket_parallel_attention", "ulysses_attention",
           "allgather_attention"]
