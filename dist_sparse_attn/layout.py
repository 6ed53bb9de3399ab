"""Sorted layout: every (batch, head) stream sorted stably by (bucket, position).

After the sort a stream is a run of buckets, each run ordered by position, with
dropped tokens (negative buckets) moved to the end. Per block of rows we keep
the bucket and position ranges of its *valid* tokens; with sorted buckets the
key blocks that can interact with a query block form one contiguous range,
found by binary search (`torch.searchsorted`), in O(N / block) per stream.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

DROP = 2 ** 31 - 1          # bucket id of dropped tokens and padding: sorts last, never matches
_POS_PAD = 0                # position of padding rows (masked by DROP anyway)


@dataclass
class SortedStreams:
    """Streams of shape (S, N) with S = B * heads, stream s = b * heads + h."""
    index: torch.Tensor     # (S, N) int64, original token index of each sorted slot
    bucket: torch.Tensor    # (S, N) int32, sorted bucket ids, DROP for dropped tokens
    pos: torch.Tensor       # (S, N) int32, positions in sorted order


def sort_streams(buckets: torch.Tensor, positions: torch.Tensor) -> SortedStreams:
    """buckets (B, N, heads) integer, positions (B, N) int64 -> SortedStreams.

    One stable sort of the key ``bucket' << 32 | (pos - min pos)`` where
    bucket' is the bucket, or DROP when negative.
    """
    B, N, heads = buckets.shape
    b = buckets.permute(0, 2, 1).to(torch.int64)                             # (B, heads, N)
    b = torch.where(b < 0, torch.full_like(b, DROP), b)
    pos = positions[:, None, :].expand(B, heads, N)                          # (B, heads, N)
    key = (b << 32) | (pos - positions.min())                                # (B, heads, N)
    _, index = torch.sort(key.reshape(B * heads, N), dim=-1, stable=True)    # (S, N)
    bucket = torch.gather(b.reshape(B * heads, N), 1, index).to(torch.int32)
    spos = torch.gather(pos.reshape(B * heads, N), 1, index).to(torch.int32)
    return SortedStreams(index=index, bucket=bucket, pos=spos)


@dataclass
class BlockMeta:
    """Per block of ``block`` sorted rows, ranges over its valid (non-dropped) rows."""
    block: int
    bmin: torch.Tensor      # (S, nb) int64, DROP when the block has no valid row
    bmax: torch.Tensor      # (S, nb) int64, DROP when the block has no valid row
    pmin: torch.Tensor      # (S, nb) int64
    pmax: torch.Tensor      # (S, nb) int64
    uniform: torch.Tensor   # (S, nb) bool: all `block` rows valid and in one bucket

    @property
    def n_blocks(self):
        return self.bmin.shape[1]


def pad_rows(x: torch.Tensor, n: int, value) -> torch.Tensor:
    """Pad the last dim of (S, N) to n with ``value``."""
    if x.shape[-1] == n:
        return x
    pad = x.new_full((*x.shape[:-1], n - x.shape[-1]), value)
    return torch.cat([x, pad], dim=-1)


def block_meta(streams: SortedStreams, block: int) -> BlockMeta:
    S, N = streams.bucket.shape
    nb = -(-N // block)
    b = pad_rows(streams.bucket.long(), nb * block, DROP).view(S, nb, block)
    p = pad_rows(streams.pos.long(), nb * block, _POS_PAD).view(S, nb, block)
    valid = b != DROP
    has = valid.any(-1)
    bmin = b.amin(-1)                                       # DROP sorts last: min is a valid one
    bmax = torch.where(valid, b, -1).amax(-1)
    bmax = torch.where(has, bmax, torch.full_like(bmax, DROP))
    big = torch.iinfo(torch.int64).max
    pmin = torch.where(valid, p, big).amin(-1)
    pmax = torch.where(valid, p, -big).amax(-1)
    uniform = valid.all(-1) & (bmin == bmax)
    return BlockMeta(block, bmin, bmax, pmin, pmax, uniform)


def live_ranges(rows: BlockMeta, cols: BlockMeta, col_stream_of_row: torch.Tensor):
    """For every row block, the contiguous range [start, end) of column blocks
    (in the row stream's column stream) whose bucket range overlaps its own.

    Both sides sorted by bucket, so the ranges follow from two binary searches.
    Row blocks with no valid row get an empty range. Returns (S_rows, nb_rows)
    int64 start and end. Causality is checked per block by the caller.
    """
    cbmax = cols.bmax[col_stream_of_row].contiguous()       # (S_rows, nb_cols)
    cbmin = cols.bmin[col_stream_of_row].contiguous()
    start = torch.searchsorted(cbmax, rows.bmin.contiguous(), right=False)
    end = torch.searchsorted(cbmin, rows.bmax.contiguous(), right=True)
    end = torch.where(rows.bmin == DROP, start, torch.maximum(start, end))
    return start, end
