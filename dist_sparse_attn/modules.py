"""``nn.Module`` attention layers over the functional API, on one device and sequence-parallel.

Both modules hold no parameters: they take projected q, k, v (FlashAttention layout)
and return the attention output, so they drop in where a model calls
``flash_attn_func`` or ``scaled_dot_product_attention``. A module's mode and options
say WHICH attention (LSH buckets, block-local heads, a bucket cap, the position keep
rule, dense, none); the module turns them into the buckets the kernels take, on one
device or on a rank's shard of the sequence. :mod:`dist_sparse_attn.model` builds its
attention from them.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import _validation as V
from ._index import arange
from .balance import cap_buckets, capped_id_bound
from .hashing import (check_seed, keep_to_buckets, local_buckets, lsh_buckets, lsh_rotations,
                      position_keep)
from .ops import (_bucketed_default_positions, bucketed_attention, hash_sparse_attention,
                  qk_sparse_attention)
from .parallel import (STRATEGIES, sequence_parallel_attention, sequence_parallel_hash_attention,
                       sequence_parallel_qk_attention)
from .parallel._comm import (DTYPE_CODES, MODE_CODES, check_group, check_overlap_chunks,
                             check_same, float_bits, gather_rows)

MODES = ("hash", "qk", "dense", "bucketed", "none")
SDPA_BACKENDS = {"auto": None, "flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                 "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}
"""``sdpa_backend`` names -> ``torch.nn.attention.SDPBackend`` members ("auto": PyTorch's choice)."""


def dense_causal_sdpa(q, k, v, backend: str = "auto", *, softmax_scale=None):
    """Dense causal attention through SDPA: q (B, N, H, D), k/v (B, N, Hkv, D) -> (B, N, H, D).
    ``backend`` names an SDPA backend (:data:`SDPA_BACKENDS`); "auto" lets PyTorch pick.
    ``softmax_scale``: default 1 / sqrt(D)."""
    g = q.shape[2] // k.shape[2]    # repeat kv heads for GQA (enable_gqa is not on every torch)
    if softmax_scale is not None and softmax_scale <= 0:
        # the same scores as scale * q.k; PyTorch's CPU flash kernel returns NaN for a
        # scale <= 0
        q, softmax_scale = q * softmax_scale, 1.0
    args = (q.transpose(1, 2), k.repeat_interleave(g, 2).transpose(1, 2),
            v.repeat_interleave(g, 2).transpose(1, 2))                        # (B, h, N, D)
    kw = {} if softmax_scale is None else {"scale": softmax_scale}
    name = SDPA_BACKENDS[backend]
    if name is None:
        y = F.scaled_dot_product_attention(*args, is_causal=True, **kw)
    else:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        try:
            with sdpa_kernel(getattr(SDPBackend, name)):
                y = F.scaled_dot_product_attention(*args, is_causal=True, **kw)
        except RuntimeError as e:
            if "No viable backend" not in str(e):
                raise
            hint = ("on the CPU only 'auto', 'flash' and 'math' run" if q.device.type == "cpu"
                    else "'auto' lets PyTorch choose one that can")
            raise ValueError(f"SDPA backend {backend!r} cannot run these inputs ({q.device.type}, "
                             f"{q.dtype}, head dim {q.shape[-1]}): {hint}") from None
    return y.transpose(1, 2)                                                   # (B, N, H, D)


def shard_offset(n_local: int, group=None, device=None) -> int:
    """Global index of the first token of this rank's contiguous shard of ``n_local``
    tokens: the sum of the lower ranks' shard lengths in ``group`` (one all_gather;
    None: the default group). Every rank of the group must call it together."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    mine = torch.tensor([n_local], dtype=torch.int64, device=device)
    lengths = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(lengths, mine, group=group)
    return int(sum(t.item() for t in lengths[:rank]))


# ---------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------

def _check_int(name, value, lo):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


def _check_options(mode, n_buckets, include_self, local_heads, local_window, bucket_cap,
                   keep_rate, sdpa_backend, backend, causal):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "hash":
        V.check_n_buckets(n_buckets)
    elif n_buckets is not None:
        raise ValueError(f"n_buckets is only used by mode='hash', got n_buckets={n_buckets!r} "
                         f"with mode={mode!r}")
    _check_int("local_heads", local_heads, 0)
    _check_int("local_window", local_window, 1)
    if local_heads and mode != "hash":
        raise ValueError(f"local_heads applies to mode='hash' only, got local_heads="
                         f"{local_heads!r} with mode={mode!r}")
    if isinstance(bucket_cap, bool) or not isinstance(bucket_cap, numbers.Real) \
            or not (bucket_cap == 0 or 1 <= bucket_cap < float("inf")):
        raise ValueError(f"bucket_cap must be 0 (off) or a finite number >= 1 (times the mean "
                         f"bucket size), got {bucket_cap!r}")
    if bucket_cap and mode != "hash":
        raise ValueError(f"bucket_cap applies to mode='hash' only, got bucket_cap={bucket_cap!r} "
                         f"with mode={mode!r}")
    if keep_rate is not None:
        if mode != "qk":
            raise ValueError(f"keep_rate applies to mode='qk' only, got keep_rate={keep_rate!r} "
                             f"with mode={mode!r}")
        if isinstance(keep_rate, bool) or not isinstance(keep_rate, numbers.Real) \
                or not 0.0 < keep_rate <= 1.0:
            raise ValueError(f"keep_rate must be None or a number in (0, 1], got {keep_rate!r}")
    if sdpa_backend is not None:
        if sdpa_backend not in SDPA_BACKENDS:
            raise ValueError(f"sdpa_backend must be None or one of {tuple(SDPA_BACKENDS)}, got "
                             f"{sdpa_backend!r}")
        if mode != "dense":
            raise ValueError(f"sdpa_backend applies to mode='dense' only, got mode={mode!r}")
        if not causal or not include_self:
            raise ValueError("sdpa_backend runs causal attention including self: it needs "
                             f"causal=True and include_self=True, got causal={causal!r}, "
                             f"include_self={include_self!r}")
        if backend != "auto":
            raise ValueError(f"backend={backend!r} picks the library's kernels, which "
                             f"sdpa_backend={sdpa_backend!r} does not run; leave backend='auto'")
    if mode in ("qk", "none") and not include_self:
        raise ValueError(f"mode={mode!r} always includes self (include_self=True)")


def _check_given(what, needs, q_keep, k_keep, q_buckets, k_buckets):
    given = {"q_keep": q_keep, "k_keep": k_keep, "q_buckets": q_buckets, "k_buckets": k_buckets}
    for name, value in given.items():
        if name in needs and value is None:
            hint = (" (or build the module with keep_rate=, which draws the masks itself)"
                    if name.endswith("_keep") else "")
            raise ValueError(f"{what} needs {name}{hint}")
        if name not in needs and value is not None:
            raise ValueError(f"{what} takes no {name}")


def _forward_args(mode, q, k, q_keep, k_keep, q_buckets, k_buckets):
    """The per-call tensors each mode needs: (q_buckets, k_buckets) for 'dense' and
    'bucketed', (q_keep, k_keep) for 'qk' (masks passed), nothing for 'hash'."""
    needs = {"qk": ("q_keep", "k_keep"), "bucketed": ("q_buckets", "k_buckets")}.get(mode, ())
    _check_given(f"mode={mode!r}", needs, q_keep, k_keep, q_buckets, k_buckets)
    if mode == "dense":     # every token in bucket 0: causal (or full) dense attention
        return (torch.zeros(q.shape[:3], dtype=torch.int64, device=q.device),
                torch.zeros(k.shape[:3], dtype=torch.int64, device=q.device))
    if mode == "qk":
        return q_keep, k_keep
    return q_buckets, k_buckets


# ---------------------------------------------------------------------------------------------
# the modules
# ---------------------------------------------------------------------------------------------

class SparseAttention(nn.Module):
    """Sparse causal attention on one device.

    Args:
        mode:

            * "hash": angular LSH buckets (``n_buckets``, ``seed``): a query attends the
              earlier keys of its bucket; options ``local_heads``, ``bucket_cap``.
            * "qk": query/key dropping: keep masks passed to ``forward``, or, with
              ``keep_rate``, the position rule :func:`~dist_sparse_attn.hashing.position_keep`.
            * "dense": every pair allowed (causal if ``causal``): through the library's
              kernels with every token in one bucket, or through PyTorch's SDPA with
              ``sdpa_backend``.
            * "bucketed": bucket ids passed to ``forward``.
            * "none": each token attends only itself: the output is its own value vector
              (repeated over the query heads of its kv head). No attention is computed
              and nothing is communicated: the attention-free floor of a benchmark.
        n_buckets: number of LSH buckets (even), mode "hash" only.
        seed: seed of the LSH rotations and of the keep rule, an integer in [0, 2**63)
            (the same on every rank and device; a model gives each layer its own).
        local_heads: mode "hash": the last ``local_heads`` kv heads (and the query heads
            that read them) take block-local buckets ``global position // local_window``
            instead of LSH buckets (:func:`~dist_sparse_attn.hashing.local_buckets`):
            causal attention within aligned windows, the short-range context hashing
            alone misses. At most the number of kv heads. 0: every head hashes.
        local_window: tokens per block-local window (>= 1).
        bucket_cap: mode "hash": 0 (off) or >= 1: every (batch, kv head, bucket) keeps at
            most ``ceil(bucket_cap * N / n_buckets)`` keys, N the length of the whole
            sequence, by splitting larger buckets into consecutive pieces in token order
            (:func:`dist_sparse_attn.balance.cap_buckets`): a query attends the most recent
            keys of its bucket's piece. Bounds the cost of a skewed hash.
        keep_rate: mode "qk": None (keep masks passed to ``forward``) or the fraction of
            (token, head) items kept, in (0, 1], by the position rule: queries with salt
            0, keys with salt 1, both with ``seed``; position 0 is always kept.
        sdpa_backend: mode "dense": None (the library's kernels, backend ``backend``) or
            the SDPA backend of causal ``F.scaled_dot_product_attention`` ("auto",
            "flash", "cudnn", "efficient", "math"; :data:`SDPA_BACKENDS`).
        causal, include_self, softmax_scale (default 1/sqrt(D)), backend: as in
            :func:`dist_sparse_attn.bucketed_attention` (modes "qk" and "none" always
            include self).

    ``forward(q, k, v, q_keep=None, k_keep=None, *, q_buckets=None, k_buckets=None,
    positions=None)``: q (B, N, H, D); k, v (B, N, Hkv, D); q_keep (B, N, H) / k_keep
    (B, N, Hkv) bool for mode "qk" without ``keep_rate``; q_buckets (B, N, H) /
    k_buckets (B, N, Hkv) integer for mode "bucketed"; positions (N,) or (B, N) integer
    GLOBAL positions of the tokens (default ``arange(N)``), read by the rules that
    depend on position (block-local buckets, which need them >= 0, and the keep rule);
    the other modes ignore them, and causality always follows the token order.
    Returns o (B, N, H, D).
    """

    def __init__(self, mode="hash", n_buckets=None, *, seed=0, causal=True, include_self=True,
                 softmax_scale=None, backend="auto", local_heads=0, local_window=512,
                 bucket_cap=0.0, keep_rate=None, sdpa_backend=None):
        super().__init__()
        V.check_scale(softmax_scale)
        V.check_backend(backend)
        V.check_flags(causal=causal, include_self=include_self)
        _check_options(mode, n_buckets, include_self, local_heads, local_window, bucket_cap,
                       keep_rate, sdpa_backend, backend, causal)
        self.mode, self.n_buckets, self.seed = mode, n_buckets, check_seed(seed)
        self.causal, self.include_self = causal, include_self
        self.softmax_scale, self.backend = softmax_scale, backend
        self.local_heads, self.local_window = int(local_heads), int(local_window)
        self.bucket_cap = float(bucket_cap)
        self.keep_rate = None if keep_rate is None else float(keep_rate)
        self.sdpa_backend = sdpa_backend

    # the functional ops behind each mode (the sequence-parallel subclass swaps them)
    _hash_fn = staticmethod(hash_sparse_attention)
    _qk_fn = staticmethod(qk_sparse_attention)
    _bucketed_fn = staticmethod(bucketed_attention)

    def _call_kwargs(self):
        return dict(causal=self.causal, softmax_scale=self.softmax_scale, backend=self.backend)

    def shard_positions(self, n: int, device=None):
        """Global positions of the n tokens of a sequence-parallel forward call when the
        caller has none (see :class:`SequenceParallelSparseAttention`). On one device,
        None: the tokens are the whole sequence, and ``forward(positions=None)`` knows
        them to be ``arange(n)``."""
        return None

    def draw_rotations(self, heads: int, kv_heads: int, head_dim: int, device):
        """Put the LSH rotations a forward on q (.., heads, head_dim) and k/v
        (.., kv_heads, head_dim) uses in the hashing cache on ``device`` (e.g. before
        ``torch.compile`` traces it). Nothing for modes other than "hash"."""
        if self.mode == "hash":
            lsh_rotations(heads, head_dim, self.n_buckets, seed=self.seed,
                          group_size=heads // kv_heads, device=device)
            lsh_rotations(kv_heads, head_dim, self.n_buckets, seed=self.seed, device=device)

    def forward(self, q, k, v, q_keep=None, k_keep=None, *, q_buckets=None, k_buckets=None,
                positions=None):
        mode = self.mode
        if mode == "none":
            _check_given("mode='none'", (), q_keep, k_keep, q_buckets, k_buckets)
            V.check_qkv(q, k, v)
            self._check_same_length(q, k)
            return v.repeat_interleave(q.shape[2] // k.shape[2], dim=2)       # (B, N, H, D)
        if mode == "hash" and (self.local_heads or self.bucket_cap):
            _check_given("mode='hash'", (), q_keep, k_keep, q_buckets, k_buckets)
            return self._hash_with_rules(q, k, v, positions)
        if mode == "qk" and self.keep_rate is not None:
            _check_given("mode='qk' with keep_rate", (), q_keep, k_keep, q_buckets, k_buckets)
            V.check_qkv(q, k, v)
            q_keep, k_keep = self._keep_masks(q, k, positions)
        elif mode == "dense" and self.sdpa_backend is not None:
            _check_given("mode='dense'", (), q_keep, k_keep, q_buckets, k_buckets)
            V.check_qkv(q, k, v)
            return dense_causal_sdpa(q, k, v, self.sdpa_backend,
                                     softmax_scale=self.softmax_scale)
        kw = self._call_kwargs()
        if mode == "hash":
            _forward_args("hash", q, k, q_keep, k_keep, q_buckets, k_buckets)
            return self._hash_fn(q, k, v, self.n_buckets, seed=self.seed,
                                 include_self=self.include_self, **kw)
        a, b = _forward_args(mode, q, k, q_keep, k_keep, q_buckets, k_buckets)
        if mode == "qk":
            return self._qk_fn(q, k, v, a, b, **kw)
        return self._bucketed_fn(q, k, v, a, b, include_self=self.include_self, **kw)

    # -- the rules that make buckets ---------------------------------------------------------

    def _makes_buckets(self) -> bool:
        """Whether a forward call makes its buckets from the module's rules (and reads
        ``positions``): block-local heads, the bucket cap, the keep rule."""
        return bool(self.local_heads or self.bucket_cap or self.keep_rate is not None)

    def _check_same_length(self, q, k):
        if k.shape[1] != q.shape[1]:
            rule = "mode='none'" if self.mode == "none" else "the module's bucket rules"
            raise ValueError(f"{rule} need q and k/v of the same length (one position per "
                             f"token), got {q.shape[1]} and {k.shape[1]}")

    def _positions(self, q, positions, *, nonnegative=False):
        """positions (N,) / (B, N) / None -> (B, N) int64 global positions of the call
        (given ones checked; ``nonnegative``: also >= 0)."""
        B, n = q.shape[:2]
        if positions is None:       # made here: valid by construction
            pos = self.shard_positions(n, q.device)
            return (arange(n, q.device) if pos is None else pos).expand(B, n)
        pos = V.normalize_positions("positions", positions, B, n, q.device)
        if nonnegative:
            V._check_range("positions", pos, 0, 2 ** 31 - 1,
                           "non-negative (block-local windows are position // local_window)")
        return pos

    @torch.no_grad()
    def _keep_masks(self, q, k, positions):
        """The keep rule's masks (B, N, H) for queries and (B, N, Hkv) for keys."""
        self._check_same_length(q, k)
        pos = self._positions(q, positions)                                    # (B, N)
        return (position_keep(pos, q.shape[0], q.shape[2], self.keep_rate, self.seed, 0),
                position_keep(pos, q.shape[0], k.shape[2], self.keep_rate, self.seed, 1))

    @torch.no_grad()
    def _lsh_buckets(self, q, k, positions):
        """LSH buckets (B, N, H) and (B, N, Hkv), the last ``local_heads`` kv heads (and
        their query heads) block-local."""
        H, Hkv = q.shape[2], k.shape[2]
        if self.local_heads > Hkv:
            raise ValueError(f"local_heads={self.local_heads} exceeds the {Hkv} kv heads of k")
        self._check_same_length(q, k)
        qb = lsh_buckets(q, self.n_buckets, seed=self.seed, group_size=H // Hkv)
        kb = lsh_buckets(k, self.n_buckets, seed=self.seed)
        if self.local_heads:
            pos = self._positions(q, positions, nonnegative=True)              # (B, N)
            qb, kb = local_buckets(qb, kb, pos, self.local_heads, self.local_window)
        return qb, kb

    @torch.no_grad()
    def _cap(self, qb, kb, n_bins=None):
        """:func:`~dist_sparse_attn.balance.cap_buckets` at ``bucket_cap`` x the mean bucket
        size of the whole sequence (its length / n_buckets keys); ``n_bins``: a bound on
        the ids, when known (saves the cap a host sync)."""
        group = self._cap_group()
        n = self._sequence_length(kb.shape[1], kb.device)
        return cap_buckets(qb, kb, self._cap_size(n), group=group, n_bins=n_bins)

    def _cap_size(self, n: int) -> int:
        """The most keys a bucket keeps under the cap, for a sequence of n tokens."""
        return max(1, math.ceil(self.bucket_cap * n / self.n_buckets))

    def _id_bound(self, n: int, positions):
        """A bound on the ids of :meth:`_lsh_buckets` for a call of n tokens on one device,
        or None where it is unknown without reading the positions back: hashed ids are
        below n_buckets, block-local ones (default positions ``arange(n)``) below
        ceil(n / local_window)."""
        if positions is not None or self._cap_group() is not None:
            return None
        return max(self.n_buckets, -(-n // self.local_window)) if self.local_heads \
            else self.n_buckets

    def _cap_group(self):
        return None         # one device

    def _sequence_length(self, n_local: int, device) -> int:
        """The whole sequence's length: a shard of n_local tokens (summed over the cap's
        group by one all_reduce when called outside a sequence-parallel forward)."""
        group = self._cap_group()
        if group is None:
            return n_local
        n_all = torch.tensor([n_local], device=device)
        dist.all_reduce(n_all, group=group)
        return int(n_all)

    @torch.no_grad()
    def buckets(self, q, k, positions=None):
        """The bucket ids this module attends with, for the modes whose buckets it makes:
        "hash" (LSH; block-local heads; the bucket cap), "qk" with ``keep_rate`` (kept 0,
        dropped -1) and "dense" (all 0). q (B, N, H, D), k (B, N, Hkv, D), positions as in
        ``forward``; returns (q_buckets (B, N, H), k_buckets (B, N, Hkv)) int64. E.g. to
        measure the balance of the buckets a model's layer uses."""
        V.check_qkv(q, k, k)
        if self.mode == "hash":
            qb, kb = self._lsh_buckets(q, k, positions)
            if not self.bucket_cap:
                return qb, kb
            return self._cap(qb, kb, self._id_bound(q.shape[1], positions))
        if self.mode == "qk" and self.keep_rate is not None:
            q_keep, k_keep = self._keep_masks(q, k, positions)
            return keep_to_buckets(q_keep), keep_to_buckets(k_keep)
        if self.mode == "dense":
            return _forward_args("dense", q, k, None, None, None, None)
        raise ValueError(f"mode={self.mode!r} makes no buckets of its own (they come from "
                         f"the caller, or there are none)")

    def _hash_with_rules(self, q, k, v, positions):
        """Mode "hash" with block-local heads or a bucket cap."""
        V.check_qkv(q, k, v)
        qb, kb = self.buckets(q, k, positions)
        # bucket ids below a bound let the stable counting sort replace torch.sort: known
        # for the default positions only (block-local ids are position // window); the
        # cap's ids stay below that bound x the most pieces of a bucket
        n = q.shape[1]
        bound = self._id_bound(n, positions)
        if bound is not None and self.bucket_cap:
            bound = capped_id_bound(bound, n, self._cap_size(n))
        return _bucketed_default_positions(q, k, v, qb, kb, bound,
                                           include_self=self.include_self,
                                           **self._call_kwargs())

    def extra_repr(self):
        s = f"mode={self.mode!r}"
        if self.mode == "hash":
            s += f", n_buckets={self.n_buckets}"
        if self.mode in ("hash", "qk"):
            s += f", seed={self.seed}"
        if self.local_heads:
            s += f", local_heads={self.local_heads}, local_window={self.local_window}"
        if self.bucket_cap:
            s += f", bucket_cap={self.bucket_cap:g}"
        if self.keep_rate is not None:
            s += f", keep_rate={self.keep_rate:g}"
        if self.sdpa_backend is not None:
            return s + f", sdpa_backend={self.sdpa_backend!r}"
        return s + f", causal={self.causal}, backend={self.backend!r}"


# the row each rank gives SequenceParallelSparseAttention's agreement exchange
_AGREE_NAMES = (None, "B", "H", "Hkv", "D", "dtype", "mode", "n_buckets", "seed",
                "local_heads", "local_window", "bucket_cap", "keep_rate",
                "positions given", "strategy", "overlap_chunks", "causal", "include_self",
                "softmax_scale", "backend", "tensors given (q_keep, k_keep, q_buckets, k_buckets)")


class SequenceParallelSparseAttention(SparseAttention):
    """Sparse causal attention over a sequence sharded across the ranks of ``group``.

    Args:
        group: the ``torch.distributed`` process group to shard over, passed explicitly
            (``None`` names the default group); the module keeps no global state.
        mode, n_buckets, seed, causal, include_self, softmax_scale, backend, local_heads,
            local_window, bucket_cap, keep_rate: as in :class:`SparseAttention` (mode
            "dense" runs the library's kernels, every token in bucket 0; mode "none"
            communicates nothing). The bucket cap counts the keys of the whole sequence
            (one all_reduce, then :func:`~dist_sparse_attn.balance.cap_buckets` over
            ``group``).
        strategy: "bucket", "ulysses" or "allgather" (see :mod:`dist_sparse_attn.parallel`).
            Default: "allgather" for modes "qk" and "dense" (each rank keeps its queries and
            gathers the kept keys; dense attention has no buckets to route by), "bucket"
            for "hash", "bucketed" and "none".
        overlap_chunks: the bucket strategy's pipeline chunks (see
            :func:`~dist_sparse_attn.parallel.sequence_parallel_attention`).

    ``forward`` takes this rank's contiguous shard (ranks in group order hold
    consecutive slices; lengths may differ) with the arguments of
    :meth:`SparseAttention.forward` and returns this rank's shard of the
    single-device result. ``positions`` are the shard's GLOBAL positions; without
    them, and where a rule reads them, the shard's offset is found by an all_gather
    of the shard lengths (:meth:`shard_positions`). Every rank of the group must call
    it together.
    """

    _hash_fn = staticmethod(sequence_parallel_hash_attention)
    _qk_fn = staticmethod(sequence_parallel_qk_attention)
    _bucketed_fn = staticmethod(sequence_parallel_attention)

    def __init__(self, group, mode="hash", n_buckets=None, *, strategy=None, seed=0,
                 causal=True, include_self=True, softmax_scale=None, backend="auto",
                 local_heads=0, local_window=512, bucket_cap=0.0, keep_rate=None,
                 overlap_chunks=1):
        super().__init__(mode, n_buckets, seed=seed, causal=causal, include_self=include_self,
                         softmax_scale=softmax_scale, backend=backend, local_heads=local_heads,
                         local_window=local_window, bucket_cap=bucket_cap, keep_rate=keep_rate)
        if strategy is None:
            strategy = "allgather" if mode in ("qk", "dense") else "bucket"
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {tuple(STRATEGIES)}, got {strategy!r}")
        self.group, self.strategy = group, strategy
        self.overlap_chunks = check_overlap_chunks(overlap_chunks)

    _agreed = None      # (offset, total length) of the forward call in progress

    def _call_kwargs(self):
        return dict(super()._call_kwargs(), group=self.group, strategy=self.strategy,
                    overlap_chunks=self.overlap_chunks)

    def forward(self, q, k, v, q_keep=None, k_keep=None, *, q_buckets=None, k_buckets=None,
                positions=None):
        self._agreed = self._agree(q, k, v, positions, (q_keep, k_keep, q_buckets, k_buckets))
        try:
            return super().forward(q, k, v, q_keep, k_keep, q_buckets=q_buckets,
                                   k_buckets=k_buckets, positions=positions)
        finally:
            self._agreed = None

    def _agree(self, q, k, v, positions, given):
        """One all_gather before any other collective of the call: every rank's module
        options and input facts must match (else every rank raises the same ValueError,
        naming the option), and an invalid input on one rank raises on every rank
        (instead of leaving the others in a collective that never completes). Returns
        (this shard's global offset, the whole sequence's length, ``positions`` and the
        validated (B, n) positions), which the rules use instead of collectives and
        checks of their own."""
        check_group(self.group)
        row, error = None, None
        try:
            V.check_qkv(q, k, v)
            B, n, H, D = q.shape
            if k.shape[1] != n:
                raise ValueError(f"q and k/v shards must have the same length, got {n} and "
                                 f"{k.shape[1]}")
            if self.local_heads > k.shape[2]:
                raise ValueError(f"local_heads={self.local_heads} exceeds the {k.shape[2]} "
                                 f"kv heads of k")
            pos = None
            if positions is not None and self._makes_buckets():
                pos = SparseAttention._positions(self, q, positions,
                                                 nonnegative=bool(self.local_heads))
            row = torch.tensor(
                [n, B, H, k.shape[2], D, DTYPE_CODES.get(q.dtype, 0), MODE_CODES[self.mode],
                 -1 if self.n_buckets is None else self.n_buckets, self.seed,
                 self.local_heads, self.local_window, float_bits(self.bucket_cap),
                 float_bits(-1.0 if self.keep_rate is None else self.keep_rate),
                 int(positions is not None and self._makes_buckets()),
                 list(STRATEGIES).index(self.strategy), self.overlap_chunks,
                 int(self.causal), int(self.include_self),
                 float_bits(-1.0 if self.softmax_scale is None else self.softmax_scale),
                 ("auto", "torch", "triton").index(self.backend),
                 sum(1 << i for i, t in enumerate(given) if t is not None)], dtype=torch.int64)
        except Exception as e:      # noqa: BLE001 -- raised after the gather, on every rank
            error = e
        what = "SequenceParallelSparseAttention"
        rows = gather_rows(row, len(_AGREE_NAMES), self.group, what=what, local_error=error)
        check_same(rows, _AGREE_NAMES, what=what,
                   floats=("bucket_cap", "keep_rate", "softmax_scale"))
        lengths = rows[:, 0].tolist()
        return sum(lengths[:dist.get_rank(self.group)]), sum(lengths), positions, pos

    def _positions(self, q, positions, *, nonnegative=False):
        agreed = self._agreed
        if agreed is not None and positions is not None and positions is agreed[2]:
            return agreed[3]        # validated by the agreement step of this call
        return super()._positions(q, positions, nonnegative=nonnegative)

    def shard_positions(self, n: int, device=None) -> torch.Tensor:
        """Global positions (n,) int64 of this rank's contiguous shard of n tokens: its
        offset (the lower ranks' shard lengths, one all_gather over the group; inside
        ``forward``, from the call's agreement exchange) + ``arange(n)``. Every rank of
        the group must call it together."""
        if self._agreed is not None:
            return arange(n, device) + self._agreed[0]
        return arange(n, device) + shard_offset(n, self.group, device)

    def _sequence_length(self, n_local: int, device) -> int:
        if self._agreed is not None:
            return self._agreed[1]
        return super()._sequence_length(n_local, device)

    def _cap_group(self):
        return dist.group.WORLD if self.group is None else self.group

    def _hash_with_rules(self, q, k, v, positions):
        """Mode "hash" with block-local heads or a bucket cap: buckets made locally (the
        same rotations on every rank), then the sequence-parallel op."""
        V.check_qkv(q, k, v)
        qb, kb = self.buckets(q, k, positions)
        return sequence_parallel_attention(q, k, v, qb, kb, include_self=self.include_self,
                                           **self._call_kwargs())

    def extra_repr(self):
        return super().extra_repr() + f", strategy={self.strategy!r}"


__all__ = ["SparseAttention", "SequenceParallelSparseAttention", "dense_causal_sdpa",
           "shard_offset", "MODES", "SDPA_BACKENDS"]
