"""Sorted layout: every (batch, head) stream sorted stably by (bucket, position).

After the sort a stream is a run of buckets, each run ordered by position, with
dropped tokens (negative buckets) moved to the end. Per block of rows we keep
the bucket and position ranges of its *valid* tokens; with sorted buckets the
key blocks that can interact with a query block form one contiguous range,
found by binary search (`torch.searchsorted`), in O(nb log nb) per stream
(nb = N / block blocks).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

DROP = 2 ** 31 - 1          # bucket id of dropped tokens and padding: sorts last, never matches


_POS_OFF = 2 ** 31           # positions (validated to int32) shifted to [0, 2**32)
_LOW = 2 ** 32 - 1           # all position bits set: "any position" within a bucket
MAX_KEY = torch.iinfo(torch.int64).max


@dataclass
class SortedStreams:
    """Streams of shape (S, N) with S = B * heads, stream s = b * heads + h."""
    index: torch.Tensor     # (S, N) int64, original token index of each sorted slot
    key: torch.Tensor       # (S, N) int64, ascending: bucket' << 32 | (pos + 2**31)

    @property
    def bucket(self) -> torch.Tensor:
        """(S, N) int32 sorted bucket ids, DROP for dropped tokens."""
        return (self.key >> 32).to(torch.int32)

    @property
    def pos(self) -> torch.Tensor:
        """(S, N) int32 positions in sorted order."""
        return ((self.key & _LOW) - _POS_OFF).to(torch.int32)


def sort_streams(buckets: torch.Tensor, positions: torch.Tensor) -> SortedStreams:
    """buckets (B, N, heads) integer, positions (B, N) int64 -> SortedStreams.

    One stable sort of the key ``bucket' << 32 | (pos + 2**31)``, where
    bucket' is the bucket, or DROP when negative. Within a bucket the key
    orders by position, so key comparisons answer causal questions too.
    """
    return sort_keys(bucket_keys(buckets, positions))


def bucket_keys(buckets: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Unsorted stream keys (S, N) int64 from buckets (B, N, heads) and positions (B, N)."""
    B, N, heads = buckets.shape
    b = buckets.permute(0, 2, 1).to(torch.int64)                             # (B, heads, N)
    b = torch.where(b < 0, torch.full_like(b, DROP), b)
    pos = positions[:, None, :].expand(B, heads, N)                          # (B, heads, N)
    return ((b << 32) | (pos + _POS_OFF)).reshape(B * heads, N).contiguous()  # (S, N)


def sort_keys(key: torch.Tensor) -> SortedStreams:
    """Stable sort of stream keys (S, N) -> SortedStreams, with ``torch.sort``.

    (``kernels.Backend.sort_keys`` sorts through the backend: there, keys whose
    buckets the caller promises in range may take a counting sort instead, with
    the same result.)
    """
    key, index = torch.sort(key, dim=-1, stable=True)
    return SortedStreams(index=index, key=key)


def pad_rows(x: torch.Tensor, n: int, value) -> torch.Tensor:
    """Pad the last dim of (S, N) to n with ``value``."""
    if x.shape[-1] == n:
        return x
    pad = x.new_full((*x.shape[:-1], n - x.shape[-1]), value)
    return torch.cat([x, pad], dim=-1)


@dataclass
class BlockKeys:
    """Sort keys at the edges of each block of ``block`` sorted rows; (S, nb) each.

    Padding rows count as MAX_KEY, dropped rows have keys >= DROP << 32, so
    ``first`` and ``last`` ascend across blocks and a block holding a dropped
    or padding row has ``last`` above every valid key.
    """
    block: int
    first: torch.Tensor       # key of the first row
    last: torch.Tensor        # key of the last row
    last_valid: torch.Tensor  # largest key of a valid row, -1 if none
    uniform: torch.Tensor     # every row valid and in one bucket

    @property
    def n_blocks(self):
        return self.first.shape[1]


def block_keys(streams: SortedStreams, block: int) -> BlockKeys:
    S, N = streams.key.shape
    nb = -(-N // block)
    key = pad_rows(streams.key, nb * block, MAX_KEY).view(S, nb, block)
    first, last = key[:, :, 0], key[:, :, -1]
    valid = key < (DROP << 32)
    last_valid = torch.where(valid, key, -1).amax(-1)
    uniform = (last < (DROP << 32)) & ((first >> 32) == (last >> 32))
    return BlockKeys(block, first.contiguous(), last.contiguous(), last_valid, uniform)


def _search(sorted_rows, values, right):
    return torch.searchsorted(sorted_rows, values.contiguous(), right=right)


def kv_ranges(qk: BlockKeys, kk: BlockKeys, kv_of_q: torch.Tensor, *, causal: bool,
              shift: int):
    """For every query block, the key blocks it must visit, as four bounds
    (S_q, nb_q) int32: ``start <= full_lo <= full_hi <= end``.

    [start, end) holds every key block with an allowed pair; blocks in
    [full_lo, full_hi) are *full* (one shared bucket, wholly in the causal
    past: no element mask), the rest are partial. Found by binary search on
    the ascending block-edge keys, O(nb log nb) per stream, no host sync.
    """
    kfirst, klast = kk.first[kv_of_q], kk.last[kv_of_q]                     # (S_q, nb_k)
    no_rows = qk.first >= (DROP << 32)                                      # no valid query
    q_bucket = qk.first >> 32
    # first key block whose last row reaches the query block's first bucket
    start = _search(klast, q_bucket << 32, right=False)
    # past the last key block whose first row the last valid query may see
    last_bucket = qk.last_valid >> 32
    reach = (qk.last_valid - shift) if causal else ((last_bucket << 32) | _LOW)
    end = _search(kfirst, reach, right=True)
    end = torch.where(no_rows, start, torch.maximum(start, end))
    # full blocks exist only for a uniform query block (bucket b): key blocks
    # whose first row is >= (b, -inf) and last row <= (b, min query pos - shift)
    full_lo = _search(kfirst, q_bucket << 32, right=False)
    full_reach = (qk.first - shift) if causal else ((q_bucket << 32) | _LOW)
    full_hi = _search(klast, full_reach, right=True)
    full_lo = torch.where(qk.uniform, full_lo.clamp(min=start), end).minimum(end)
    full_hi = torch.where(qk.uniform, full_hi, end).clamp(min=full_lo).minimum(end)
    return tuple(x.to(torch.int32) for x in (start, full_lo, full_hi, end))


def q_ranges(qk: BlockKeys, kk: BlockKeys, kv_of_q: torch.Tensor, *, causal: bool,
             shift: int):
    """The transpose of :func:`kv_ranges`: for every query stream and every key
    block of its kv stream, the query blocks that see it, as four bounds
    (S_q, nb_k) int32 ``start <= full_lo <= full_hi <= end`` (the dK/dV pass).
    """
    kfirst, klast = kk.first[kv_of_q], kk.last[kv_of_q]                     # (S_q, nb_k)
    klast_valid = kk.last_valid[kv_of_q]
    kuniform = kk.uniform[kv_of_q]
    no_rows = kfirst >= (DROP << 32)
    k_bucket = kfirst >> 32
    # first query block whose last row may see the key block's first row
    start = _search(qk.last, (kfirst + shift) if causal else (k_bucket << 32), right=False)
    # past the last query block that starts within the key block's last bucket
    end = _search(qk.first, ((klast_valid >> 32) << 32) | _LOW, right=True)
    end = torch.where(no_rows, start, torch.maximum(start, end))
    # full: query blocks with first row >= (b, max key pos + shift), last row <= (b, +inf)
    full_lo = _search(qk.first, (klast + shift) if causal else (k_bucket << 32), right=False)
    full_hi = _search(qk.last, (k_bucket << 32) | _LOW, right=True)
    full_lo = torch.where(kuniform, full_lo.clamp(min=start), end).minimum(end)
    full_hi = torch.where(kuniform, full_hi, end).clamp(min=full_lo).minimum(end)
    return tuple(x.to(torch.int32) for x in (start, full_lo, full_hi, end))
