"""Bucketing: angular LSH bucket ids, block-local buckets (:func:`local_buckets`), the
position keep rule of QK-sparse attention (:func:`position_keep`) and keep-masks as
bucket ids.

Two LSH schemes, chosen by ``n_buckets`` alone, so every rank and device agrees:

* **classic** (``n_buckets <= 64``): ``bucket = argmax([xR ; -xR])`` with one
  Gaussian rotation R (D, n_buckets / 2) per rotation index. Cost O(N D n_buckets).
* **product** (``n_buckets > 64``): ``n_buckets = f_1 * ... * f_k`` (see
  :func:`lsh_scheme`), each factor an angular hash of its own rotation block
  (even f: ``argmax([xR_i ; -xR_i])``, R_i (D, f/2); odd f: ``argmax(xR_i)``,
  R_i (D, f)); the bucket is the mixed-radix number of the sub-buckets, h_1
  most significant. Cost O(N D C) with C = the rotation columns of all factors,
  e.g. 48 = 16 + 32 for 2048 = 32 * 64 buckets instead of 1024. At most 63
  columns per factor and 5 factors (6 when merged) at any n_buckets, so hashing
  cost is linear in N at a fixed bucket size (the classic scheme's is quadratic). The
  columns are orthonormal across factors as far as D allows (see
  :func:`rotation_groups`), so isotropic inputs fill all buckets equally; raw
  Gaussian columns have unequal norms, which skews a large argmax towards the
  longest ones (64k random tokens, D = 64, 2048 buckets: the fullest bucket
  held 11-12x the mean with one Gaussian rotation, 1.8x with the product scheme,
  about the maximum of a fair draw of 32 tokens per bucket).

A scheme's rotations are one float32 tensor (heads // group_size, D, C), C the
total number of columns of its blocks (classic: n_buckets / 2), drawn on the
CPU from ``torch.Generator().manual_seed(seed)``.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from . import kernels
from ._index import arange
from ._validation import check_n_buckets

CLASSIC_MAX_BUCKETS = 64    # n_buckets up to this hash with the classic scheme
MAX_FACTOR = 64             # largest factor of the product scheme
_MERGE_OVERSAMPLE = 8       # fine buckets per bucket (at least) of a merged product scheme


@dataclass(frozen=True)
class LSHScheme:
    """How ``n_buckets`` buckets are hashed (derived from ``n_buckets`` alone).

    ``factors``: f_1 .. f_k, the bucket is ``((h_1 f_2 + h_2) f_3 + h_3) ...``;
    ``merge``: 0, or M (a power of two) when the factors hash into M fine buckets
    and ``bucket = fine * n_buckets // M``; ``classic``: the single-rotation
    scheme of ``n_buckets <= 64`` (raw Gaussian rotation, one factor).
    """
    n_buckets: int
    factors: tuple
    merge: int = 0
    classic: bool = False

    @property
    def columns(self) -> tuple:
        """Rotation columns of each factor: f/2 (even f, both signs) or f (odd f)."""
        return tuple(f // 2 if f % 2 == 0 else f for f in self.factors)

    @property
    def n_columns(self) -> int:
        return sum(self.columns)

    @property
    def blocks(self):
        """(factor, first column, columns, signed) of every factor, h_1 first."""
        out, c0 = [], 0
        for f, c in zip(self.factors, self.columns):
            out.append((f, c0, c, f % 2 == 0))
            c0 += c
        return tuple(out)


_SCHEMES: dict = {}


def lsh_scheme(n_buckets: int) -> LSHScheme:
    """The hashing scheme of ``n_buckets`` (even, 2 .. 2**30).

    * ``n_buckets <= 64``: classic, one factor ``(n_buckets,)``.
    * otherwise the fewest factors, each in [2, 64], whose product is
      ``n_buckets``; among those the smallest sum of factors (the most balanced
      split, and the fewest rotation columns), then the lexicographically
      smallest ascending tuple. E.g. 128 = 8 * 16, 2048 = 32 * 64,
      4096 = 64 * 64, 8192 = 16 * 16 * 32, 65536 = 32 * 32 * 64, 6000 = 15 * 20 * 20.
    * when ``n_buckets`` has a prime factor above 64 (e.g. 134 = 2 * 67): a
      product scheme of M fine buckets, M the smallest power of two
      ``>= 8 * n_buckets``, merged by ``bucket = fine * n_buckets // M``; every
      bucket then collects ``floor(M / n_buckets)`` or one more fine buckets (at
      least 8), so merging costs at most a 9/8 imbalance.

    A plain dict cache, not ``functools.lru_cache`` (readable under torch.compile).
    """
    check_n_buckets(n_buckets)
    n_buckets = int(n_buckets)
    scheme = _SCHEMES.get(n_buckets)
    if scheme is None:
        if n_buckets <= CLASSIC_MAX_BUCKETS:
            scheme = LSHScheme(n_buckets, (n_buckets,), classic=True)
        else:
            factors = _factorize(n_buckets)
            if factors is not None:
                scheme = LSHScheme(n_buckets, factors)
            else:
                fine = 1 << (_MERGE_OVERSAMPLE * n_buckets - 1).bit_length()
                scheme = LSHScheme(n_buckets, _factorize(fine), merge=fine)
        _SCHEMES[n_buckets] = scheme
    return scheme


def _factorize(n: int):
    """Fewest factors in [2, MAX_FACTOR] with product n, ascending; smallest sum,
    then lexicographically smallest. None when a prime factor exceeds MAX_FACTOR."""
    rest = n
    for p in range(2, MAX_FACTOR + 1):
        while rest % p == 0:
            rest //= p
    if rest != 1:
        return None
    k = 1
    while True:
        best = _best_split(n, k, 2)
        if best is not None:
            return best
        k += 1


def _best_split(n: int, k: int, lo: int):
    """Best ascending k-tuple of factors in [lo, MAX_FACTOR] with product n, or None."""
    if k == 1:
        return (n,) if lo <= n <= MAX_FACTOR else None
    best = None
    for f in range(lo, MAX_FACTOR + 1):
        if f ** k > n:          # ascending: the smallest factor is at most n^(1/k)
            break
        if n % f:
            continue
        rest = _best_split(n // f, k - 1, f)
        if rest is not None:
            cand = (f,) + rest
            if best is None or (sum(cand), cand) < (sum(best), best):
                best = cand
    return best


def check_seed(seed):
    """Seeds are Python or numpy integers in [0, 2**63) (not bool): the seed of
    ``torch.Generator().manual_seed``. Returns it as an int."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) \
            or not 0 <= seed < 2 ** 63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    return int(seed)


def lsh_rotations(heads: int, dim: int, n_buckets: int, *, seed: int = 0,
                  group_size: int = 1, device=None) -> torch.Tensor:
    """The rotations of :func:`lsh_buckets`: float32 (heads // group_size, D, C).

    C is ``lsh_scheme(n_buckets).n_columns`` (``n_buckets // 2`` for the
    classic scheme, n_buckets <= 64). Drawn on the CPU as
    ``torch.randn(heads // group_size, D, C, generator=torch.Generator().manual_seed(seed))``,
    so every device and every rank obtains the same matrices; for the product
    scheme the columns of the factors' blocks are then made orthonormal, across
    factors as far as D allows (:func:`rotation_groups`; modified Gram-Schmidt in
    float64 with sums in a fixed order, independent of the CPU's vector width),
    a block of more columns than D gets unit-norm columns.

    ``device=None`` draws a new CPU tensor. With a device, the tensor is drawn
    once and cached there (shared: do not modify it), e.g. to draw every
    layer's rotations before ``torch.compile`` traces the model.
    """
    for name, v in (("heads", heads), ("dim", dim), ("group_size", group_size)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if heads % group_size:
        raise ValueError(f"group_size must be a positive divisor of heads={heads}, "
                         f"got {group_size!r}")
    seed = check_seed(seed)
    scheme = lsh_scheme(n_buckets)
    if device is not None:
        return _rotations_on(device, int(heads), int(dim), scheme.n_buckets, seed,
                             int(group_size))
    return _draw_rotations(int(heads) // int(group_size), int(dim), scheme, seed)


def _draw_rotations(g: int, dim: int, scheme: LSHScheme, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    rot = torch.randn(g, dim, scheme.n_columns, generator=gen, dtype=torch.float32)
    if scheme.classic:
        return rot
    for c0, c in rotation_groups(scheme, dim):
        block = rot[:, :, c0:c0 + c].double()                              # (g, D, c)
        if c <= dim:
            block = _orthonormalize(block)
        else:
            block = block / _ordered_dot(block, block).sqrt()[:, None, :]
        rot[:, :, c0:c0 + c] = block.float()
    return rot


def rotation_groups(scheme: LSHScheme, dim: int):
    """Column ranges (first, count) made orthonormal together: the factors' blocks in
    order, packed while a group keeps <= dim columns (a block of more than dim
    columns stands alone and gets unit-norm columns instead).

    Orthogonal across factors, not only within each: the projections of an
    isotropic x on orthonormal columns are independent, so the factors'
    sub-buckets are independent and every bucket is equally likely. Blocks that
    are orthonormal only within themselves give each factor uniform sub-buckets
    but correlated ones (2.8x max/mean bucket size at 256 = 16 * 16, D = 64)."""
    groups = []
    for _, c0, c, _ in scheme.blocks:
        if groups and groups[-1][1] + c <= dim:
            groups[-1] = (groups[-1][0], groups[-1][1] + c)
        else:
            groups.append((c0, c))
    return tuple(groups)


def _ordered_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Column dot products over dim 1 of (g, D, c) float64, summed strictly in
    order of D (a sequential scan, the same on every CPU): (g, c)."""
    return (a * b).cumsum(1)[:, -1]


def _orthonormalize(a: torch.Tensor) -> torch.Tensor:
    """Modified Gram-Schmidt on the columns of (g, D, c) float64, c <= D."""
    v = a.clone()
    for i in range(v.shape[2]):
        qi = v[:, :, i:i + 1] / _ordered_dot(v[:, :, i:i + 1], v[:, :, i:i + 1]).sqrt()[:, None]
        v[:, :, i:i + 1] = qi
        if i + 1 < v.shape[2]:
            rest = v[:, :, i + 1:]
            v[:, :, i + 1:] = rest - qi * _ordered_dot(qi, rest)[:, None, :]
    return v


_ROTATIONS: dict = {}
_ROTATIONS_MAX = 4096     # entries of (heads/g, D, C) floats: layers x devices x q/k


def _rotations_on(device, heads, dim, n_buckets, seed, group_size):
    """The rotations (heads // group_size, D, C) on ``device``, drawn once
    (no host-device copy per call). Arguments already validated.

    A plain dict, not ``functools.lru_cache``: under ``torch.compile`` dynamo reads a
    cached entry as a constant tensor, where it would trace through an lru_cache into
    the CPU generator and break the graph (``GPTConfig.compile="model"`` draws every
    layer's rotations before compiling). Built outside inference mode, so a first call
    under ``torch.inference_mode()`` does not cache a tensor that autograd later refuses."""
    key = (str(device), heads, dim, n_buckets, seed, group_size)
    rot = _ROTATIONS.get(key)
    if rot is None:
        with torch.inference_mode(False):
            rot = _draw_rotations(heads // group_size, dim, lsh_scheme(n_buckets),
                                  seed).to(device)
        if len(_ROTATIONS) >= _ROTATIONS_MAX:       # evict the oldest entry (dicts keep order)
            del _ROTATIONS[next(iter(_ROTATIONS))]
        _ROTATIONS[key] = rot
    return rot


def _check_lsh_args(x, n_buckets, seed, group_size):
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-D tensor (B, N, heads, D), got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got dtype {x.dtype}")
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"x must have at least one head and a head dim >= 1, got shape "
                         f"{tuple(x.shape)}")
    check_n_buckets(n_buckets)
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) \
            or group_size < 1 or x.shape[2] % group_size:
        raise ValueError(f"group_size must be a positive divisor of heads={x.shape[2]}, "
                         f"got {group_size!r}")
    return check_seed(seed)


def lsh_sort_keys(x: torch.Tensor, n_buckets: int, *, seed: int = 0,
                  group_size: int = 1) -> torch.Tensor:
    """Stream sort keys (B * heads, N) int64 (``layout.bucket_keys``) of the buckets
    of :func:`lsh_buckets` at positions ``arange(N)``: on the fused backend one kernel
    writes them directly."""
    seed = _check_lsh_args(x, n_buckets, seed, group_size)
    group_size = int(group_size)
    return _hash(x, _rotations_on(x.device, x.shape[2], x.shape[3], int(n_buckets), seed,
                                  group_size), int(n_buckets), group_size, keys=True)


def lsh_buckets(x: torch.Tensor, n_buckets: int, *, seed: int = 0,
                group_size: int = 1) -> torch.Tensor:
    """Angular LSH bucket of every token and head.

    x: (B, N, heads, D) floating. Head ``h`` uses rotation ``h // group_size``
    of :func:`lsh_rotations` (``heads // group_size`` rotations).
    ``n_buckets``: even, 2 .. 2**30; seed: integer in [0, 2**63).

    * ``n_buckets <= 64``: ``argmax([xR ; -xR])``, R (D, n_buckets / 2) Gaussian
      (first maximal index: ties go to the lower bucket, the + half first).
    * ``n_buckets > 64``: a product of small angular hashes (see
      :func:`lsh_scheme`), each ``argmax`` over its own block of orthonormal
      rotation columns: at most 64 columns per factor, so the cost per token is
      bounded at any n_buckets (linear in N at a fixed bucket size), and
      isotropic inputs fill all buckets equally (while the factors' columns fit
      in D, e.g. up to 65536 buckets at D = 64). These buckets differ from
      those of versions that hashed every n_buckets with one rotation.

    Returns (B, N, heads) int64 in ``[0, n_buckets)``. Deterministic per seed,
    the same on every device and rank (up to float32 rounding of near-ties,
    whose projections are summed in another order by the fused CUDA kernel),
    invariant to positive scaling of x.
    """
    seed = _check_lsh_args(x, n_buckets, seed, group_size)
    group_size = int(group_size)
    B, N, Hx, D = x.shape
    rot = _rotations_on(x.device, Hx, D, int(n_buckets), seed, group_size)  # (Hx/g, D, C)
    return _hash(x, rot, int(n_buckets), group_size)


def buckets_from_rotations(x: torch.Tensor, rotations: torch.Tensor, n_buckets: int,
                           group_size: int = 1) -> torch.Tensor:
    """:func:`lsh_buckets` with given rotations (heads // group_size, D, C) float32 on
    x's device, e.g. rows of :func:`lsh_rotations` for a subset of the heads.
    Returns (B, N, heads) int64 in ``[0, n_buckets)``."""
    _check_lsh_args(x, n_buckets, 0, group_size)
    group_size = int(group_size)
    B, N, Hx, D = x.shape
    want = (Hx // group_size, D, lsh_scheme(n_buckets).n_columns)
    if not isinstance(rotations, torch.Tensor) or tuple(rotations.shape) != want \
            or rotations.dtype != torch.float32:
        raise ValueError(f"rotations must be a float32 tensor of shape (heads // group_size, "
                         f"D, C) = {want}, got "
                         f"{getattr(rotations, 'shape', type(rotations).__name__)} "
                         f"{getattr(rotations, 'dtype', '')}")
    if rotations.device != x.device:
        raise ValueError(f"rotations.device {rotations.device} differs from x.device "
                         f"{x.device}")
    return _hash(x, rotations, int(n_buckets), group_size)


def _hash(x, rot, n_buckets: int, group_size: int, *, keys: bool = False) -> torch.Tensor:
    """Buckets (B, N, heads) of x with rotations ``rot`` (heads // group_size, D, C), or
    the sort keys (B * heads, N): computed by the backend the registry picks for x
    (the fused Triton kernel for CUDA tensors outside ``torch.compile`` tracing, PyTorch
    ops elsewhere; see :class:`~dist_sparse_attn.kernels.Backend`)."""
    backend = kernels.select("auto", x.device, x.dtype)
    return backend.lsh(x, rot, lsh_scheme(n_buckets), group_size, keys=keys)


def keep_to_buckets(keep: torch.Tensor) -> torch.Tensor:
    """QK-sparse keep-mask (bool) -> bucket ids: kept tokens 0, dropped -1."""
    return torch.where(keep, 0, -1).to(torch.int64)


def position_keep(positions: torch.Tensor, batch: int, heads: int, keep_rate: float,
                  seed: int, salt: int) -> torch.Tensor:
    """QK-sparse keep rule by position: a token is kept for a head iff a hash of its
    GLOBAL position, the head, ``seed`` and ``salt`` (one for queries, another for keys)
    falls below ``keep_rate``; the token at position 0 is always kept, so every kept
    query has a key. The rule is causal and data independent (a token's fate never
    depends on other tokens, so no information leaks from the future) and local
    (sequence-parallel shards need only their global positions). The hash is Knuth's
    multiplicative one, whose fractions of consecutive positions are evenly spread:
    every window of L tokens keeps ``keep_rate * L`` of them up to a token or two.

    positions (n,) or (B, n) integer -> keep (batch, n, heads) bool.
    """
    pos = positions.long()
    pos = (pos[None] if pos.dim() == 1 else pos).expand(batch, -1)             # (B, n)
    head = arange(heads, pos.device)                                           # (heads,)
    # the seed's term taken mod 2**32 (the hash keeps the low 32 bits): any seed < 2**63
    salted = ((seed * 2 + salt) * 668265261) & 0xFFFFFFFF
    mixed = (pos[..., None] * 2654435761 + (head + 1) * 1540483477
             + salted) & 0xFFFFFFFF                                           # (B, n, heads)
    return (mixed.double() / 2 ** 32 < keep_rate) | (pos == 0)[..., None]


def local_buckets(q_buckets: torch.Tensor, k_buckets: torch.Tensor, positions: torch.Tensor,
                  local_heads: int, window: int, *, n_kv_heads: int | None = None,
                  kv_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-local heads: the last ``local_heads`` kv heads of the model (and the query
    heads that read them) take the bucket ``position // window`` instead of the given
    one, so they attend causally within aligned windows of ``window`` tokens.

    Args:
        q_buckets: (B, n, h) integer; query head i reads kv head i // (h // hkv).
        k_buckets: (B, n, hkv) integer.
        positions: (n,) or (B, n) non-negative integer positions of the tokens.
        local_heads: how many of the model's kv heads are local (the last ones).
        window: tokens per window (>= 1).
        n_kv_heads: the model's kv heads (default hkv: the call holds all of them).
        kv_index: (hkv,) the model's index of each kv head of the call (default
            ``arange(hkv)``), for callers holding a subset of the heads.

    Returns (q_buckets, k_buckets) int64, new tensors.
    """
    B, hkv = k_buckets.shape[0], k_buckets.shape[2]
    h = q_buckets.shape[2]
    dev = k_buckets.device
    if kv_index is None:
        kv_index = arange(hkv, dev)
    n_kv_heads = hkv if n_kv_heads is None else n_kv_heads
    if not 0 <= local_heads <= n_kv_heads:
        # more would silently make every head local (no head hashes)
        raise ValueError(f"local_heads={local_heads} must be in [0, {n_kv_heads}], the "
                         f"model's kv heads")
    pos = positions.long()
    win = ((pos[None] if pos.dim() == 1 else pos).expand(B, -1) // window)[..., None]  # (B, n, 1)
    kv_local = kv_index >= n_kv_heads - local_heads                            # (hkv,)
    q_local = kv_local[arange(h, dev) // (h // hkv)]                           # (h,)
    return (torch.where(q_local, win, q_buckets.long()),
            torch.where(kv_local, win, k_buckets.long()))
