"""Bucket balance: a cap on the number of keys any bucket holds.

Hashing does not promise equal buckets. On the q/k of a trained model a few buckets
can hold many times the mean, and a bucket of n queries and n keys costs n² / 2 (the
largest bucket's tiles dominate the kernel, and the sequence-parallel owner of that
bucket waits longest). :func:`cap_buckets` bounds it: every (batch, kv head, bucket)
whose keys outnumber ``max_size`` is split, in token order, into consecutive pieces
of at most ``max_size`` keys, and every query goes to the piece of the most recent key
of its bucket (at or before its own position):

    rank_k(t) = #{keys t' < t in t's bucket}               piece_k(t) = rank_k(t) // max_size
    count_q(i) = #{keys t <= i in i's bucket}              piece_q(i) = max(count_q(i) - 1, 0) // max_size
    bucket'   = bucket * pieces + piece                    (negative buckets stay negative)

A query then attends the earlier keys of its bucket that lie in its piece: the most
recent ``1 .. max_size`` of them, like a window of the bucket's own history, instead
of all of them. Buckets at or under the cap are unchanged (one piece). A token's
piece depends only on the keys before it, so nothing leaks from the future, and the
result is exactly ``bucketed_attention`` with the new bucket ids.

Positions are the token indexes (the default positions ``arange(N)``); with ``group``
the inputs are this rank's contiguous shard of a sequence sharded in rank order (as in
:mod:`dist_sparse_attn.parallel`), and the counts of the lower ranks' keys are added
(one small all_gather to check the ranks' arguments and agree on the bucket range, one
all_gather of per-bucket counts).
"""
from __future__ import annotations

import numbers

import torch
import torch.distributed as dist

_ID_LIMIT = 2 ** 31 - 1          # bucket ids stay below the DROP sentinel of the layout


def cap_buckets(q_buckets: torch.Tensor, k_buckets: torch.Tensor, max_size: int, *,
                group=None, n_bins: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Split buckets holding more than ``max_size`` keys (module docstring).

    Args:
        q_buckets: (B, Nq, H) integer, negative = dropped; query head h reads kv head
            h // (H // Hkv).
        k_buckets: (B, Nk, Hkv) integer, negative = dropped.
        max_size: the most keys one (batch, kv head, bucket) keeps, an int >= 1.
        group: None (one device), or the process group the sequence is sharded over
            (this rank's contiguous shard; every rank of the group must call, with the
            same B, H, Hkv and max_size: otherwise, or when one rank's arguments are
            invalid, every rank raises a ValueError).
        n_bins: None, or the caller's promise that every bucket id is below ``n_bins``
            (not checked: that would need a host sync). Without it the largest id is read
            back (one host synchronisation); the result is the same either way.

    Returns (q_buckets, k_buckets) int64 of the same shapes: new ids in
    ``[0, (max bucket + 1) * pieces)``, negative where the input was negative.
    """
    if group is None:
        _check_args(q_buckets, k_buckets, max_size, n_bins)
        nbins = int(n_bins) if n_bins is not None else _max_id(q_buckets, k_buckets) + 1
        total_k = k_buckets.shape[1]
    else:
        # ONE small all_gather of every rank's facts: an invalid input, or a shape or
        # max_size that differs between ranks, raises a ValueError on every rank (alone,
        # a rank would leave the others waiting, or mismatch their count exchange)
        from ._collective import check_same, gather_rows
        row = error = None
        try:
            _check_args(q_buckets, k_buckets, max_size, n_bins)
            nb = int(n_bins) if n_bins is not None else _max_id(q_buckets, k_buckets) + 1
            row = torch.tensor([nb, k_buckets.shape[1], *q_buckets.shape[::2],
                                k_buckets.shape[2], int(max_size)], dtype=torch.int64)
        except ValueError as e:
            error = e
        rows = gather_rows(row, 6, group, what="cap_buckets", local_error=error)
        check_same(rows, (None, None, "B", "H", "Hkv", "max_size"), what="cap_buckets")
        nbins, total_k = int(rows[:, 0].max()), int(rows[:, 1].sum())
        rank = dist.get_rank(group)
    max_size = int(max_size)
    B, Nq, H = q_buckets.shape
    Nk, Hkv = k_buckets.shape[1:]
    g = H // Hkv
    dev = q_buckets.device
    kb = k_buckets.long().permute(0, 2, 1).reshape(B * Hkv, Nk).contiguous()  # (Sk, Nk)
    qb = q_buckets.long().permute(0, 2, 1).reshape(B * Hkv, g * Nq).contiguous()  # (Sk, g*Nq)
    q_idx = torch.arange(Nq, device=dev).repeat(g)                          # (g*Nq,)
    nbins = max(nbins, 1)
    pieces = _pieces(total_k, max_size)
    if nbins * pieces >= _ID_LIMIT:
        raise ValueError(f"cap_buckets: {nbins} buckets x {pieces} pieces of <= {max_size} "
                         f"keys need ids beyond 2**31 - 2; use a larger max_size")

    # ---- keys: rank within the bucket, in token order (stable sort by bucket) ----------
    drop = torch.full_like(kb, nbins)
    kkey = torch.where(kb >= 0, kb, drop)                                     # (Sk, Nk)
    sk, order = (x.contiguous() for x in torch.sort(kkey, dim=1, stable=True))
    first = torch.searchsorted(sk, sk, right=False)                          # bucket start
    rank_sorted = torch.arange(Nk, device=dev).expand_as(sk) - first
    rank_k = torch.empty_like(rank_sorted).scatter_(1, order, rank_sorted)   # (Sk, Nk)
    # ---- queries: keys of the bucket at or before the query's position -------------------
    # composite key bucket * (Nk + 1) + index: ascending along the sorted key rows
    comp = sk * (Nk + 1) + order                                             # (Sk, Nk)
    qkey = torch.where(qb >= 0, qb, nbins)
    lo = torch.searchsorted(comp, qkey * (Nk + 1), right=False)
    # (a query index past the last key, Nq > Nk, counts every key of its bucket)
    hi = torch.searchsorted(comp, qkey * (Nk + 1) + q_idx.clamp(max=Nk), right=True)
    count_q = hi - lo                                                         # (Sk, g*Nq)

    if group is not None:           # keys of the lower ranks come first in every bucket
        counts = torch.zeros(B * Hkv, nbins + 1, dtype=torch.int64, device=dev)
        counts.scatter_add_(1, kkey, torch.ones_like(kkey))
        every = _all_gather(counts, group)                                    # (P, Sk, nb+1)
        below = every[:rank].sum(0)                                           # (Sk, nb+1)
        rank_k = rank_k + torch.gather(below, 1, kkey)
        count_q = count_q + torch.gather(below, 1, qkey)

    piece_k = rank_k // max_size
    piece_q = (count_q - 1).clamp(min=0) // max_size
    new_k = torch.where(kb >= 0, kb * pieces + piece_k, -1)
    new_q = torch.where(qb >= 0, qb * pieces + piece_q, -1)
    new_k = new_k.view(B, Hkv, Nk).permute(0, 2, 1)                          # (B, Nk, Hkv)
    new_q = new_q.view(B, Hkv, g, Nq).permute(0, 3, 1, 2).reshape(B, Nq, H)   # (B, Nq, H)
    return new_q.contiguous(), new_k.contiguous()


def _check_args(q_buckets, k_buckets, max_size, n_bins):
    """ValueErrors for :func:`cap_buckets`'s arguments."""
    for name, b in (("q_buckets", q_buckets), ("k_buckets", k_buckets)):
        if not isinstance(b, torch.Tensor) or b.dim() != 3 or b.dtype.is_floating_point \
                or b.dtype == torch.bool or b.dtype.is_complex:
            raise ValueError(f"{name} must be an integer tensor (B, N, heads), got "
                             f"{getattr(b, 'dtype', type(b).__name__)} "
                             f"{tuple(getattr(b, 'shape', ()))}")
    B, Nq, H = q_buckets.shape
    Bk, Nk, Hkv = k_buckets.shape
    if Bk != B or Hkv < 1 or H % Hkv:
        raise ValueError(f"q_buckets (B, N, H) = {tuple(q_buckets.shape)} and k_buckets "
                         f"{tuple(k_buckets.shape)} need the same B and H % Hkv == 0")
    if k_buckets.device != q_buckets.device:
        raise ValueError(f"k_buckets.device {k_buckets.device} differs from "
                         f"q_buckets.device {q_buckets.device}")
    if not _is_count(max_size):
        raise ValueError(f"max_size must be an int >= 1, got {max_size!r}")
    if n_bins is not None and not _is_count(n_bins):
        raise ValueError(f"n_bins must be None or an int >= 1, got {n_bins!r}")


def _max_id(q_buckets, k_buckets) -> int:
    """The largest bucket id of either tensor (-1 for none): one host synchronisation."""
    return max(int(t.max()) if t.numel() else -1 for t in (q_buckets, k_buckets))


def _is_count(x) -> bool:
    """An int >= 1 (a bool is not)."""
    return not isinstance(x, bool) and isinstance(x, numbers.Integral) and x >= 1


def capped_id_bound(n_bins: int, n_keys: int, max_size: int) -> int:
    """A bound on the ids :func:`cap_buckets` returns for ids below ``n_bins``, with
    ``n_keys`` keys per stream (the whole sequence's when sharded) and ``max_size``:
    ``n_bins`` x the most pieces a bucket can have."""
    return n_bins * _pieces(n_keys, max_size)


def _pieces(n_keys: int, max_size: int) -> int:
    return max(1, -(-n_keys // max_size))


def bucket_sizes(buckets: torch.Tensor) -> torch.Tensor:
    """Tokens per (batch, head, bucket) of non-negative bucket ids (B, N, heads): a
    (B, heads, max bucket + 1) int64 count (for balance statistics)."""
    B, N, heads = buckets.shape
    b = buckets.long().permute(0, 2, 1).reshape(B * heads, N)
    nb = int(b.max()) + 1 if b.numel() else 1
    out = torch.zeros(B * heads, nb + 1, dtype=torch.int64, device=b.device)
    out.scatter_add_(1, torch.where(b >= 0, b, nb), torch.ones_like(b))
    return out[:, :nb].view(B, heads, nb)


def _all_gather(t: torch.Tensor, group) -> torch.Tensor:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t.contiguous(), group=group)
    return torch.stack(out)
