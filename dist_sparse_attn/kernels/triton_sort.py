"""Stable counting sort of stream keys by bucket, in Triton (no host sync).

``layout.sort_keys`` sorts the stream keys ``bucket' << 32 | (pos + 2**31)``
(S, N) int64 with ``torch.sort(stable=True)``; on CUDA that is a CUB
segmented radix sort over 64-bit keys, about 8 launches and ~0.36 ms of host
time per call on an H100. When the position part ascends along every stream
(default positions ``arange(N)``, as ``hashing.lsh_sort_keys`` writes them),
sorting the key stably equals sorting stably by the bucket alone, and buckets
are small integers: a counting sort gives the very same (key, index).
``kernels.Backend.sort_keys`` takes it for keys whose caller promises this.

Precondition of :func:`bucket_sort_streams` (not checked: checking would need
a host sync):
  * the bucket part ``key >> 32`` of every key is in ``[0, n_buckets)`` or is
    ``layout.DROP`` (2**31 - 1, dropped tokens; they go last);
  * the position part is non-decreasing along each stream.
Keys that break it are still permuted (every token lands exactly once:
out-of-range buckets count as DROP), but the result is then sorted by bucket
only, not by key, and differs from ``torch.sort``.

Algorithm, per stream split into chunks of C tokens (C a power of two, 16 to
2048, grown with the bucket count so the histogram holds at most N entries
where it can):
  1. ``_count_kernel`` (grid chunks x S): zero this chunk's column of the
     histogram ``hist[s, bin, chunk]`` (bins = n_buckets + 1, DROP last,
     bucket-major), barrier, then one relaxed atomic add per token.
  2. Offsets = exclusive prefix sum of ``hist`` in (bin, chunk) order per
     stream. For small histograms (next_pow2(bins) * next_pow2(chunks) <=
     2048: e.g. 16 buckets up to N = 16k) every program of step 3 loads its
     stream's whole histogram and computes the prefix itself; otherwise one
     ``torch.cumsum`` over the flattened histogram of all streams (int64; a
     CUB scan, 1-2 launches), from which step 3 subtracts the stream's base.
  3. ``_place_kernel`` (grid chunks x S): sort the chunk's
     ``bin * C + local index`` (bitonic ``tl.sort``, int32; a C x C rank
     sort under the interpreter, where tl.sort is very slow), rank each token
     among the earlier tokens of its bin in the chunk (segmented scan), and
     scatter key and index to ``offset[s, bin, chunk] + rank``. Tokens of a
     bin keep their order: the sort is stable.
Launches: 2 (fused prefix) or 3-4 (with the cumsum), plus allocations.
"""
from __future__ import annotations

import numbers

import torch
import triton
import triton.language as tl

from . import interpreting

MAX_BUCKETS = 2 ** 16       # keeps bin * C + local index inside int32
_MIN_CHUNK, _CHUNK, _MAX_CHUNK = 16, 256, 2048
# largest per-stream histogram (padded) whose prefix every program of step 3
# computes itself; each program reads the whole histogram, so the total read is
# S * chunks * tile: keep it small (a guess, not tuned on a GPU)
_FUSE_TILE = 2048
_HIST_RATIO = 4             # counting sort only while hist entries per stream <= 4 N
_MAX_STREAMS = 65535        # CUDA grid dimension y


@triton.jit
def _bin(key, NB):
    """Counting bin of a key: its bucket, NB for DROP (and anything out of range)."""
    b = key >> 32
    return tl.where((b >= 0) & (b < NB), b, NB).to(tl.int32)


@triton.jit
def _seg_add(b1, c1, b2, c2):
    # segmented sum over a sorted run of bins: restart the count where the bin changes
    return b2, c2 + tl.where(b1 == b2, c1, 0)


@triton.jit
def _sort_by_rank(x, C: tl.constexpr):
    """Ascending sort of C distinct values by ranking (C x C compares): for the
    interpreter only, where tl.sort's bitonic network runs ~100x slower (its
    reductions go element by element through Python). GPUs use tl.sort."""
    rank = tl.sum((x[None, :] < x[:, None]).to(tl.int32), 1)              # rank of x[i]
    slot = tl.arange(0, C)
    return tl.sum(tl.where(rank[None, :] == slot[:, None], x[None, :], 0), 1)


@triton.jit
def _count_kernel(KEY, HIST, N, L, chunks, NB, C: tl.constexpr, ZB: tl.constexpr):
    c = tl.program_id(0)
    s = tl.program_id(1)
    hrow = HIST + s.to(tl.int64) * L + c               # column (s, :, c), stride `chunks`
    # this program alone owns column (s, :, c): zero it, then count into it
    for b0 in range(0, NB + 1, ZB):
        b = b0 + tl.arange(0, ZB)
        tl.store(hrow + b.to(tl.int64) * chunks, tl.zeros([ZB], tl.int64), mask=b <= NB)
    tl.debug_barrier()     # the zeros precede every thread's atomics (CTA-scope ordering)
    tok = c * C + tl.arange(0, C)
    ok = tok < N
    key = tl.load(KEY + s.to(tl.int64) * N + tok, mask=ok, other=0)
    b = _bin(key, NB)
    tl.atomic_add(hrow + b.to(tl.int64) * chunks, tl.full([C], 1, tl.int64), mask=ok,
                  sem="relaxed")


@triton.jit
def _place_kernel(KEY, HIST, CUM, OUT_KEY, OUT_IDX, N, L, chunks, NB,
                  C: tl.constexpr, LOG_C: tl.constexpr, FUSED: tl.constexpr,
                  BINS_P2: tl.constexpr, CHUNKS_P2: tl.constexpr, INTERPRET: tl.constexpr):
    c = tl.program_id(0)
    s = tl.program_id(1)
    row = s.to(tl.int64) * N
    hrow = s.to(tl.int64) * L
    offs = tl.arange(0, C)
    tok = c * C + offs
    key = tl.load(KEY + row + tok, mask=tok < N, other=0)
    # the chunk in (bin, local index) order (distinct values); padding (past N)
    # takes bin NB + 1 and sorts last
    comp = (tl.where(tok < N, _bin(key, NB), NB + 1) << LOG_C) | offs
    if INTERPRET:
        comp = _sort_by_rank(comp, C)
    else:
        comp = tl.sort(comp)
    valid = offs < N - c * C                      # sorted slot holds a real token
    sb = comp >> LOG_C                            # its bin
    src = c * C + (comp & (C - 1))                # its token index in the stream
    # rank among the earlier tokens of the same bin in this chunk
    _, cnt = tl.associative_scan((sb, tl.full([C], 1, tl.int32)), 0, _seg_add)
    rank = cnt - 1
    if FUSED:
        # exclusive prefix of hist[s] in (bin, chunk) order at (bin, c), for every bin
        bi = tl.arange(0, BINS_P2)
        ci = tl.arange(0, CHUNKS_P2)
        tile = tl.load(HIST + hrow + bi[:, None] * chunks + ci[None, :],
                       mask=(bi[:, None] <= NB) & (ci[None, :] < chunks), other=0).to(tl.int32)
        tot = tl.sum(tile, 1)                                        # tokens per bin
        before = tl.sum(tl.where(ci[None, :] < c, tile, 0), 1)       # ... in earlier chunks
        off = tl.cumsum(tot, 0) - tot + before
        dest = (tl.gather(off, tl.minimum(sb, BINS_P2 - 1), 0) + rank).to(tl.int64)
    else:
        # CUM: inclusive cumsum of the flattened hist of all streams
        base = tl.load(CUM + hrow) - tl.load(HIST + hrow)            # tokens of streams < s
        h = hrow + sb.to(tl.int64) * chunks + c
        dest = (tl.load(CUM + h, mask=valid, other=0) - tl.load(HIST + h, mask=valid, other=0)
                - base + rank)
    k = tl.load(KEY + row + src, mask=valid)
    tl.store(OUT_KEY + row + dest, k, mask=valid)
    tl.store(OUT_IDX + row + dest, src.to(tl.int64), mask=valid)


def _chunk_size(n: int, bins: int) -> int:
    """Chunk C: 256 (smaller for short streams), doubled up to 2048 while the
    histogram (bins x chunks) would hold more entries than the stream has tokens."""
    c = min(_CHUNK, max(_MIN_CHUNK, triton.next_power_of_2(max(n, 1))))
    while c < _MAX_CHUNK and c < n and bins * triton.cdiv(n, c) > n:
        c *= 2
    return c


def counting_sort_applies(n_streams: int, n: int, n_buckets: int) -> bool:
    """Whether :func:`bucket_sort_streams` should replace ``torch.sort`` for
    (n_streams, n) keys with n_buckets buckets: the histogram stays within
    4 N entries per stream (even at the largest chunk: many buckets on a short
    stream are left to torch.sort, where the histogram would dwarf the keys),
    the grid fits (<= 65535 streams) and n <= 2**30 (int32 token arithmetic).
    Sizes only, no device work."""
    if not (1 <= n_buckets <= MAX_BUCKETS and 1 <= n_streams <= _MAX_STREAMS
            and 1 <= n <= 2 ** 30):
        return False
    bins = n_buckets + 1
    return bins * triton.cdiv(n, _chunk_size(n, bins)) <= _HIST_RATIO * n


def bucket_sort_streams(key: torch.Tensor, n_buckets: int, *, chunk: int | None = None):
    """Stable sort of stream keys by bucket: ``(sorted_key, index)``, both (S, N) int64.

    key: (S, N) int64 ``bucket' << 32 | (pos + 2**31)`` on CUDA (or CPU under
    TRITON_INTERPRET=1). Under the module's precondition (bucket parts in
    ``[0, n_buckets)`` or DROP, positions non-decreasing along each stream)
    the result equals ``torch.sort(key, dim=-1, stable=True)`` exactly.
    Two to four launches, no host sync. ``chunk`` (a power of two, 16..2048)
    overrides the chunk size, for tests. Use :func:`counting_sort_applies`
    to decide between this and torch.sort; this function runs regardless.
    """
    if key.dim() != 2 or key.dtype != torch.int64:
        raise ValueError(f"key must be (S, N) int64, got {tuple(key.shape)} {key.dtype}")
    if isinstance(n_buckets, bool) or not isinstance(n_buckets, numbers.Integral) \
            or not 1 <= n_buckets <= MAX_BUCKETS:
        raise ValueError(f"n_buckets must be an int in [1, {MAX_BUCKETS}], got {n_buckets!r}")
    n_buckets = int(n_buckets)
    S, N = key.shape
    if S > _MAX_STREAMS or N > 2 ** 30:
        raise ValueError(f"at most {_MAX_STREAMS} streams of <= 2**30 tokens, got {S} x {N}")
    out_key, out_idx = torch.empty_like(key), torch.empty_like(key)
    if S == 0 or N == 0:
        return out_key, out_idx
    key = key.contiguous()
    bins = n_buckets + 1                       # DROP (and out-of-range) is the last bin
    C = chunk if chunk is not None else _chunk_size(N, bins)
    if C & (C - 1) or not _MIN_CHUNK <= C <= _MAX_CHUNK:
        raise ValueError(f"chunk must be a power of two in [16, 2048], got {C}")
    chunks = triton.cdiv(N, C)
    L = bins * chunks                          # histogram entries per stream
    bins_p2, chunks_p2 = triton.next_power_of_2(bins), triton.next_power_of_2(chunks)
    fused = bins_p2 * chunks_p2 <= _FUSE_TILE
    warps = {16: 1, 32: 1, 64: 1, 128: 2, 256: 4, 512: 4}.get(C, 8)
    hist = torch.empty(S * L, dtype=torch.int64, device=key.device)
    _count_kernel[(chunks, S)](key, hist, N, L, chunks, n_buckets, C=C,
                               ZB=min(1024, bins_p2), num_warps=warps)
    # one scan over all streams (a per-row scan of long rows is slow in torch);
    # int64: S * N may pass 2**31
    cum = hist if fused else torch.cumsum(hist, 0)
    _place_kernel[(chunks, S)](key, hist, cum, out_key, out_idx, N, L, chunks, n_buckets,
                               C=C, LOG_C=C.bit_length() - 1, FUSED=fused,
                               BINS_P2=bins_p2 if fused else 1,
                               CHUNKS_P2=chunks_p2 if fused else 1, INTERPRET=interpreting(),
                               num_warps=max(warps, 4) if fused else warps)
    return out_key, out_idx
