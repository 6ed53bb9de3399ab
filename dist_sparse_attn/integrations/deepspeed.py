"""Sparse attention inside DeepSpeed training (``deepspeed.initialize``, DeepSpeed-Ulysses).

DeepSpeed is imported lazily, inside the functions that need it: this module
imports without it (every group lookup then finds none).

Two ways to use the library's sparse attention in a DeepSpeed model:

* :class:`DeepSpeedSparseAttention`: the library's own sequence parallelism
  (:class:`dist_sparse_attn.SequenceParallelSparseAttention`) over the
  sequence-parallel group DeepSpeed created, found at forward time, so the
  module can be built before ``deepspeed.initialize``. Each rank feeds its
  contiguous shard of the sequence; without a group it is plain
  :class:`dist_sparse_attn.SparseAttention`.
* :class:`UlyssesLocalSparseAttention` / :func:`ulysses_sparse_attention`: the
  local attention of DeepSpeed-Ulysses' ``DistributedAttention`` (heads
  all-to-all, then attention over the whole sequence with H/P heads per rank).

:class:`UlyssesDenseAttention` is DeepSpeed-Ulysses itself over dense SDPA, the
baseline the sparse attention is measured against; :func:`ulysses_dense_attention`
builds it for a GPT layer (``parallelize(model, group, ulysses_dense_attention)``, the
training config's ``sp_strategy="ds-ulysses"``).

DeepSpeed's sequence-parallel group (0.19.8): ``deepspeed.initialize`` builds a
(data_parallel, sequence_parallel) device mesh when its config has both
``"sequence_parallel_size"`` and ``"data_parallel_size"`` (or when ``mesh_param``
is passed), and the engine keeps the "sequence_parallel" dimension's group as
``engine.seq_parallel_group`` (set only when its size is > 1);
``deepspeed.utils.groups._get_sequence_parallel_group()`` returns it (or an
``mpu``'s) and raises ``KeyError`` when there is none.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn

from .. import _validation as V
from .._index import arange
from ..hashing import buckets_from_rotations, check_seed, lsh_rotations
from ..kernels import resolve as _resolve_backend
from ..modules import (SDPA_BACKENDS, SequenceParallelSparseAttention, SparseAttention,
                       _forward_args, dense_causal_sdpa, shard_offset)
from ..parallel import _comm
from ..plan import softmax_scale_for


# ---------------------------------------------------------------------------------------------
# the group
# ---------------------------------------------------------------------------------------------

def deepspeed_sequence_parallel_group(engine=None):
    """The sequence-parallel process group DeepSpeed set up, or None.

    Looks at ``engine.seq_parallel_group`` first (when an engine is given and has
    one), then at ``deepspeed.utils.groups._get_sequence_parallel_group()`` (the
    mesh ``deepspeed.initialize`` built from the config's ``"sequence_parallel_size"``
    and ``"data_parallel_size"``, or an ``mpu`` with ``get_sequence_parallel_group``).

    Returns None when DeepSpeed is not installed, ``torch.distributed`` is not
    initialized, there is no such group, or its size is 1.
    """
    group = getattr(engine, "seq_parallel_group", None) if engine is not None else None
    if group is None:
        if not dist.is_available() or not dist.is_initialized():
            return None
        try:
            from deepspeed.utils import groups
        except ImportError:
            return None
        try:
            group = groups._get_sequence_parallel_group()
        except KeyError:        # "No sequence parallel group found"
            return None
    if group is None or dist.get_world_size(group) <= 1:
        return None
    return group


def _warn_if_config_mesh():
    """Warn (once) when the sequence-parallel group is DeepSpeed's config mesh without an
    ``mpu``: DeepSpeed 0.19.8 then does not reduce parameter gradients across the
    sequence-parallel ranks (see :mod:`dist_sparse_attn.integrations.ds_groups`)."""
    global _MESH_WARNED
    if _MESH_WARNED:
        return
    try:
        from deepspeed.utils import groups
    except ImportError:
        return
    if getattr(groups, "mpu", None) is None and getattr(groups, "mesh_device", None) is not None:
        import warnings
        warnings.warn(
            "DeepSpeedSparseAttention: the sequence-parallel group comes from DeepSpeed's config "
            "mesh (sequence_parallel_size / data_parallel_size) without an mpu; DeepSpeed "
            "0.19.8 then does not sum parameter gradients across sequence-parallel ranks, so "
            "their weights drift apart. Pass mpu=dist_sparse_attn.integrations."
            "SequenceParallelMPU(sp) to deepspeed.initialize instead.", RuntimeWarning,
            stacklevel=3)
        _MESH_WARNED = True


_MESH_WARNED = False


def _check_group(name, value):
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(f"{name} must be 'auto', None or a torch.distributed ProcessGroup, "
                             f"got {value!r}")
    elif value is not None and not isinstance(value, dist.ProcessGroup):
        raise ValueError(f"{name} must be 'auto', None or a torch.distributed ProcessGroup, "
                         f"got {type(value).__name__}")


def _resolve(value):
    """'auto' -> DeepSpeed's group; a group of size 1 or None -> None."""
    if isinstance(value, str):
        return deepspeed_sequence_parallel_group()
    if value is None or dist.get_world_size(value) <= 1:
        return None
    return value


# ---------------------------------------------------------------------------------------------
# the library's sequence parallelism over DeepSpeed's group
# ---------------------------------------------------------------------------------------------

class DeepSpeedSparseAttention(nn.Module):
    """Sparse causal attention for a model trained with ``deepspeed.initialize``.

    Args:
        mode, n_buckets, seed, causal, include_self, softmax_scale, backend: as in
            :class:`dist_sparse_attn.SparseAttention`.
        sequence_parallel: "auto" (default): at every forward, the group of
            :func:`deepspeed_sequence_parallel_group` (so the module can be built
            before ``deepspeed.initialize`` creates it); a ``ProcessGroup``: that
            group; None: local attention.
        strategy: as in :class:`dist_sparse_attn.SequenceParallelSparseAttention`
            (used only when a group is found).

    ``forward(q, k, v, q_keep=None, k_keep=None, *, q_buckets=None, k_buckets=None)``
    with q (B, n, H, D), k/v (B, n, Hkv, D) and the per-mode tensors of
    :meth:`dist_sparse_attn.SparseAttention.forward` for the same n tokens:

    * a group of size > 1 resolved: the tensors are this rank's contiguous shard
      of the sequence (ranks in group order, lengths may differ) and the result is
      exactly ``SequenceParallelSparseAttention(group, ...)``'s: this rank's shard
      of the single-device result on the whole sequence. Every rank of the group
      must call it together.
    * otherwise: exactly ``SparseAttention(...)`` on the given tensors.

    Outputs and the gradients flowing back to q, k, v match the single-device
    attention on the whole sequence (tested under ZeRO 0-3). Parameter
    gradients are reduced by DeepSpeed, not here; with a config mesh
    (``"sequence_parallel_size"`` + ``"data_parallel_size"``, no ``mpu``) DeepSpeed
    0.19.8 all-reduces them over the "data_parallel" mesh dimension only, divided by
    ``data_parallel_size / sequence_parallel_size``. Measured on CPU/gloo with
    sequence_parallel_size 2, data_parallel_size 1: under ZeRO 0-2 each rank keeps
    twice its own contribution and the ranks' parameters drift apart after a step;
    under ZeRO-3 every rank steps with the mean of the two ranks' contributions.
    For training, pass ``mpu=SequenceParallelMPU(sp)``
    (:mod:`dist_sparse_attn.integrations.ds_groups`) to ``deepspeed.initialize``
    instead of the config mesh: DeepSpeed then sums the gradients over the whole
    dp x sp grid and divides by dp (ZeRO 0-2), which is the single-device update;
    under ZeRO-3 it divides by dp x sp, so scale the loss given to
    ``engine.backward`` by sp (what :mod:`dist_sparse_attn.train` does; its tests
    compare the losses with a one-process run).
    """

    def __init__(self, mode="hash", n_buckets=None, *, sequence_parallel="auto", strategy=None,
                 seed=0, causal=True, include_self=True, softmax_scale=None, backend="auto"):
        super().__init__()
        _check_group("sequence_parallel", sequence_parallel)
        kw = dict(seed=seed, causal=causal, include_self=include_self,
                  softmax_scale=softmax_scale, backend=backend)
        self.local = SparseAttention(mode, n_buckets, **kw)        # validates the arguments
        # group set at every forward (None names the default group: never used as such)
        self.parallel = SequenceParallelSparseAttention(None, mode, n_buckets, strategy=strategy,
                                                        **kw)
        self.sequence_parallel = sequence_parallel

    @property
    def mode(self):
        return self.local.mode

    def process_group(self):
        """The group a forward call would shard over now, or None (local attention)."""
        return _resolve(self.sequence_parallel)

    def forward(self, q, k, v, q_keep=None, k_keep=None, *, q_buckets=None, k_buckets=None):
        group = self.process_group()
        if group is None:
            return self.local(q, k, v, q_keep, k_keep, q_buckets=q_buckets, k_buckets=k_buckets)
        if self.sequence_parallel == "auto" and torch.is_grad_enabled():
            _warn_if_config_mesh()
        self.parallel.group = group
        return self.parallel(q, k, v, q_keep, k_keep, q_buckets=q_buckets, k_buckets=k_buckets)

    def extra_repr(self):
        sp = self.sequence_parallel
        return f"sequence_parallel={sp if sp is None or isinstance(sp, str) else 'ProcessGroup'!r}"


# ---------------------------------------------------------------------------------------------
# DeepSpeed-Ulysses: the local attention of DistributedAttention
# ---------------------------------------------------------------------------------------------

def ulysses_lsh_buckets(q, k, n_buckets, *, seed=0, rank=0, world=1):
    """LSH buckets of one Ulysses rank's heads, hashed with their GLOBAL head's rotation.

    q (B, N, H/P, D) and k (B, N, Hkv/P, D) hold heads ``[rank * H/P, (rank+1) * H/P)``
    and kv heads ``[rank * Hkv/P, (rank+1) * Hkv/P)`` of the whole model (DeepSpeed's
    even head split over ``world`` = P ranks). Kv head j of the model (and its query
    heads j*g .. j*g+g-1, g = H // Hkv) uses row j of
    ``lsh_rotations(H, D, n_buckets, seed=seed, group_size=g)``, as in
    :func:`dist_sparse_attn.hash_sparse_attention` on all heads, so the buckets equal
    the columns of ``lsh_buckets(q_all, ..., group_size=g)`` / ``lsh_buckets(k_all, ...)``
    for these heads. Returns (q_buckets (B, N, H/P), k_buckets (B, N, Hkv/P)) int64.
    """
    V.check_qkv(q, k, k)
    V.check_n_buckets(n_buckets)
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be a positive int, got {world!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
        raise ValueError(f"rank must be an int in [0, world={world}), got {rank!r}")
    h, hkv, D = q.shape[2], k.shape[2], q.shape[3]
    g = h // hkv
    rot = lsh_rotations(world * h, D, n_buckets, seed=seed, group_size=g,
                        device=q.device)                                    # (P*hkv, D, C)
    rot = rot[rank * hkv:(rank + 1) * hkv].contiguous()
    with torch.no_grad():
        return (buckets_from_rotations(q.detach(), rot, n_buckets, g),
                buckets_from_rotations(k.detach(), rot, n_buckets, 1))


class UlyssesLocalSparseAttention(nn.Module):
    """Sparse attention as the local attention of DeepSpeed-Ulysses' ``DistributedAttention``.

    Built for ``DistributedAttention(local, group, scatter_idx=2, gather_idx=1)`` called
    as ``forward(q, k, v, batch_dim_idx=0, ...)`` on shards q (B, N/P, H, D), k/v
    (B, N/P, Hkv, D): DeepSpeed exchanges heads, calls this module with the whole
    sequence and this rank's heads, q (B, N, H/P, D), k/v (B, N, Hkv/P, D) (rank r of
    ``group`` holds heads ``[r*H/P, (r+1)*H/P)`` and kv heads ``[r*Hkv/P, (r+1)*Hkv/P)``),
    and exchanges the output (B, N, H/P, D) back. :func:`ulysses_sparse_attention`
    builds that wrapper, with checks.

    Args:
        group: the group ``DistributedAttention`` splits heads over (pass the same one),
            "auto" (default: :func:`deepspeed_sequence_parallel_group` at every forward),
            or None (one rank: plain :class:`dist_sparse_attn.SparseAttention`).
        mode, n_buckets, seed, causal, include_self, softmax_scale, backend: as in
            :class:`dist_sparse_attn.SparseAttention`.

    ``forward(q, k, v, q_keep=None, k_keep=None, *, q_buckets=None, k_buckets=None)``,
    the per-mode tensors passed as keyword arguments through ``DistributedAttention``:

    * "hash": each rank hashes its heads with the rotations of their GLOBAL head
      indexes (:func:`ulysses_lsh_buckets`), so the gathered result equals
      ``hash_sparse_attention(q_all, k_all, v_all, n_buckets, seed=seed)`` on the whole
      sequence and all heads (up to floating-point rounding of the attention; the
      buckets are the same). Needs DeepSpeed's even head split: the group size
      divides Hkv (and H).
    * "qk": ``q_keep`` (B, N, H/P) / ``k_keep`` (B, N, Hkv/P) for the whole sequence
      and this rank's heads (the columns of the model-wide masks for those heads);
      equals ``qk_sparse_attention`` on everything.
    * "bucketed": ``q_buckets`` / ``k_buckets`` likewise; "dense": every token in
      bucket 0 (causal dense attention).
    """

    def __init__(self, group="auto", mode="hash", n_buckets=None, *, seed=0, causal=True,
                 include_self=True, softmax_scale=None, backend="auto"):
        super().__init__()
        _check_group("group", group)
        if mode == "none":
            raise ValueError("mode='none' exchanges nothing: use SparseAttention('none') "
                             "without DistributedAttention")
        kw = dict(causal=causal, include_self=include_self, softmax_scale=softmax_scale,
                  backend=backend)
        attn = SparseAttention(mode, n_buckets, seed=seed, **kw)    # validates the arguments
        # hash mode: buckets made here (global-head rotations), attention on them
        self.attn = SparseAttention("bucketed", **kw) if mode == "hash" else attn
        self.group, self.mode, self.n_buckets, self.seed = group, mode, n_buckets, check_seed(seed)

    def process_group(self):
        """The head-parallel group now (None: one rank)."""
        return _resolve(self.group)

    # what every rank of the group must agree on (see SparseDistributedAttention.forward)
    AGREEMENT = ("B", "N/P", "H", "Hkv", "D", "dtype", "device", "mode", "n_buckets", "seed",
                 "softmax_scale", "causal", "include_self", "backend")

    def agreement_row(self, q, k, v) -> torch.Tensor:
        """This rank's values of :attr:`AGREEMENT` for shards q (B, N/P, H, D), k/v
        (B, N/P, Hkv, D), int64 (raises ValueError on invalid shards)."""
        V.check_qkv(q, k, v)
        B, n, H, D = q.shape
        a = self.attn
        return torch.tensor(
            [B, n, H, k.shape[2], D, _comm.DTYPE_CODES[q.dtype],
             _comm.DEVICE_CODES.get(q.device.type, 2), _comm.MODE_CODES[self.mode],
             -1 if self.n_buckets is None else int(self.n_buckets), self.seed,
             _comm.float_bits(softmax_scale_for(D, a.softmax_scale)), int(a.causal),
             int(a.include_self), _comm.BACKEND_CODES[_resolve_backend(a.backend, q.device,
                                                                       q.dtype)]],
            dtype=torch.int64)

    def forward(self, q, k, v, q_keep=None, k_keep=None, *, q_buckets=None, k_buckets=None):
        if self.mode != "hash":
            return self.attn(q, k, v, q_keep, k_keep, q_buckets=q_buckets, k_buckets=k_buckets)
        _forward_args("hash", q, k, q_keep, k_keep, q_buckets, k_buckets)   # rejects them
        group = self.process_group()
        world, rank = (1, 0) if group is None else (dist.get_world_size(group),
                                                    dist.get_rank(group))
        qb, kb = ulysses_lsh_buckets(q, k, self.n_buckets, seed=self.seed, rank=rank,
                                     world=world)
        return self.attn(q, k, v, q_buckets=qb, k_buckets=kb)

    def extra_repr(self):
        nb = f", n_buckets={self.n_buckets}, seed={self.seed}" if self.mode == "hash" else ""
        g = self.group
        return f"group={g if g is None or isinstance(g, str) else 'ProcessGroup'!r}, " \
               f"mode={self.mode!r}{nb}"


def _check_batch_dim(batch_dim_idx):
    if batch_dim_idx != 0:
        raise ValueError(f"batch_dim_idx must be 0 (layout (B, N, heads, D)), "
                         f"got {batch_dim_idx!r}")


def _check_mode_tensors(mode, query, key, P, args, kwargs):
    """The per-mode tensors of a Ulysses call, before the head exchange: the local module
    receives them as they are, for the whole sequence (B, n * P) and this rank's heads
    (H / P query, Hkv / P kv), from shards query (B, n, H, D), key (B, n, Hkv, D)."""
    names = ("q_keep", "k_keep")
    if len(args) > len(names):
        raise ValueError(f"ulysses_sparse_attention takes at most {len(names)} positional "
                         f"mask arguments (q_keep, k_keep), got {len(args)}")
    given = dict(zip(names, args))
    for nm in ("q_keep", "k_keep", "q_buckets", "k_buckets"):
        if nm in kwargs:
            if nm in given:
                raise ValueError(f"{nm} given both by position and by keyword")
            given[nm] = kwargs[nm]
    _forward_args(mode, query, key, given.get("q_keep"), given.get("k_keep"),
                  given.get("q_buckets"), given.get("k_buckets"))    # which are needed
    B, n = query.shape[:2]
    heads = {"q": query.shape[2] // P, "k": key.shape[2] // P}
    for nm, t in given.items():
        if t is None:
            continue
        check = V.check_keep if nm.endswith("keep") else V.check_buckets
        check(nm, t, B, n * P, heads[nm[0]], query.device)


@functools.lru_cache(maxsize=None)
def _sparse_distributed_attention_class():
    """``DistributedAttention`` with the group resolved at forward time and checked
    arguments (built on first use: DeepSpeed is imported here)."""
    from deepspeed.sequence.layer import DistributedAttention, apply_rotary_pos_emb

    class SparseDistributedAttention(DistributedAttention):
        """DeepSpeed-Ulysses over :class:`UlyssesLocalSparseAttention` (see
        :func:`ulysses_sparse_attention`)."""

        def forward(self, query, key, value, batch_dim_idx=0, rotary_pos_emb=None, *args,
                    **kwargs):
            group = self.local_attn.process_group()
            if group is None:           # one rank: no exchange, the same rotary embedding
                _check_batch_dim(batch_dim_idx)
                if rotary_pos_emb is not None:
                    cos, sin = (t.permute(1, 0, 2, 3) for t in rotary_pos_emb)
                    query = apply_rotary_pos_emb(query, cos, sin)
                    key = apply_rotary_pos_emb(key, cos, sin)
                return self.local_attn(query, key, value, *args, **kwargs)
            # Check this rank's shards and that every rank agrees (shapes, dtype, mode,
            # n_buckets, seed, scale, causal, include_self, backend) with ONE all_gather
            # before the head exchange: a rank that differed would otherwise hash or mask
            # its heads differently and return a wrong result without an error, and a
            # rank that raised alone would leave the others waiting in the exchange.
            row, error = None, None
            try:
                _check_batch_dim(batch_dim_idx)
                P = dist.get_world_size(group)
                for name, t in (("query", query), ("key", key), ("value", value)):
                    if not isinstance(t, torch.Tensor) or t.dim() != 4:
                        raise ValueError(f"{name} must be a 4-D tensor (B, N/P, heads, D), got "
                                         f"{getattr(t, 'shape', type(t).__name__)}")
                    if t.shape[2] % P:
                        raise ValueError(
                            f"{name} heads ({t.shape[2]}) must be divisible by the "
                            f"sequence-parallel group size ({P}): DeepSpeed's uneven-heads "
                            "split is not supported")
                if self.num_kv_heads is not None and self.num_kv_heads != key.shape[2]:
                    raise ValueError(f"num_kv_heads ({self.num_kv_heads}) differs from the key "
                                     f"heads ({key.shape[2]})")
                row = self.local_attn.agreement_row(query, key, value)
                _check_mode_tensors(self.local_attn.mode, query, key, P, args, kwargs)
            except Exception as e:      # noqa: BLE001 -- raised on every rank after the gather
                error = e
            what = "ulysses_sparse_attention"
            rows = _comm.gather_rows(row, len(self.local_attn.AGREEMENT), group, what=what,
                                     local_error=error)
            _comm.check_same(rows, self.local_attn.AGREEMENT, what=what,
                             floats=("softmax_scale",))
            self.spg = group
            return super().forward(query, key, value, batch_dim_idx, rotary_pos_emb, *args,
                                   **kwargs)

    return SparseDistributedAttention


def ulysses_sparse_attention(group="auto", mode="hash", n_buckets=None, **kwargs):
    """DeepSpeed-Ulysses with sparse local attention: a ``DistributedAttention``.

    Returns ``DistributedAttention(UlyssesLocalSparseAttention(group, mode, n_buckets,
    **kwargs), group, scatter_idx=2, gather_idx=1)`` (a subclass) whose forward
    ``(q, k, v, batch_dim_idx=0, rotary_pos_emb=None, **mode_kwargs)`` takes this
    rank's contiguous, equal-length shard q (B, N/P, H, D), k/v (B, N/P, Hkv, D) and
    returns its shard (B, N/P, H, D) of the single-device result on the whole
    sequence. ``mode_kwargs`` are the local module's (``q_keep``/``k_keep`` or
    ``q_buckets``/``k_buckets`` for the whole sequence and this rank's heads).

    The group is resolved at every forward ("auto": DeepSpeed's sequence-parallel
    group, so this can be built before ``deepspeed.initialize``); with none (or one
    of size 1) the local attention runs on the given tensors. Raises ValueError when
    H or Hkv is not divisible by the group size (DeepSpeed's uneven-heads path is
    not supported) or ``batch_dim_idx`` is not 0. Needs ``deepspeed.comm``
    initialized (``deepspeed.init_distributed`` or ``deepspeed.initialize``).
    """
    local = UlyssesLocalSparseAttention(group, mode, n_buckets, **kwargs)
    cls = _sparse_distributed_attention_class()
    return cls(local, group if isinstance(group, dist.ProcessGroup) else None,
               scatter_idx=2, gather_idx=1)


# ---------------------------------------------------------------------------------------------
# DeepSpeed-Ulysses over dense SDPA: the baseline
# ---------------------------------------------------------------------------------------------

class UlyssesDenseAttention(nn.Module):
    """DeepSpeed-Ulysses over dense causal SDPA: ``DistributedAttention`` (heads
    all-to-all) around :func:`dist_sparse_attn.modules.dense_causal_sdpa`, as a user of
    DeepSpeed would run dense attention with sequence parallelism. The dense baseline of
    the benchmarks (the GPT's strategy "ds-ulysses"). Before DeepSpeed's exchange one small
    all_gather checks that every rank holds the same B, shard length n, H, Hkv, D, dtype
    and device, and that the group size divides H and Hkv: otherwise every rank raises
    the same ValueError (DeepSpeed itself would abort a process on uneven shards).

    Args:
        group: the ``torch.distributed`` process group the sequence is sharded over.
        sdpa_backend: the SDPA backend, "auto" (PyTorch's choice), "flash", "cudnn",
            "efficient" or "math".

    ``forward(q, k, v, *, positions=None)``: this rank's contiguous shard q (B, n, H, D),
    k/v (B, n, Hkv, D) -> its shard (B, n, H, D) of dense causal attention over the whole
    sequence. DeepSpeed's rules, checked as above: every rank holds n tokens (equal
    shards) and the group size divides H and Hkv. ``positions`` (the interface of
    :class:`dist_sparse_attn.SequenceParallelSparseAttention`) are not read: dense
    attention has no rule by position. Needs ``deepspeed.comm`` initialized
    (``deepspeed.init_distributed`` or ``deepspeed.initialize``).
    """

    def __init__(self, group, sdpa_backend="auto"):
        super().__init__()
        if not isinstance(group, dist.ProcessGroup):
            raise ValueError(f"group must be a torch.distributed ProcessGroup, got "
                             f"{type(group).__name__}")
        if sdpa_backend not in SDPA_BACKENDS:
            raise ValueError(f"sdpa_backend must be one of {tuple(SDPA_BACKENDS)}, got "
                             f"{sdpa_backend!r}")
        self.group, self.sdpa_backend = group, sdpa_backend

    def shard_positions(self, n: int, device=None) -> torch.Tensor:
        """Global positions (n,) of this rank's shard (one all_gather of the lengths)."""
        return arange(n, device) + shard_offset(n, self.group, device)

    def _local(self, q, k, v, *args, **kwargs):
        return dense_causal_sdpa(q, k, v, self.sdpa_backend)

    # what every rank must agree on before DeepSpeed's exchange (see forward)
    AGREEMENT = ("B", "shard length n", "H", "Hkv", "D", "dtype", "device")

    def forward(self, q, k, v, *, positions=None):
        from deepspeed.sequence.layer import DistributedAttention   # a cheap wrapper object
        # DeepSpeed's all-to-all assumes equal shards and an even head split: one small
        # all_gather checks them first, so a rank that differs raises the same ValueError
        # on every rank instead of aborting a process or failing an assert on one rank
        what = "UlyssesDenseAttention"
        P = dist.get_world_size(self.group)
        row = error = None
        try:
            V.check_qkv(q, k, v)
            if k.shape[1] != q.shape[1]:
                raise ValueError(f"{what}: k/v hold {k.shape[1]} tokens, q {q.shape[1]} "
                                 "(self-attention on one shard)")
            H, Hkv = q.shape[2], k.shape[2]
            if H % P or Hkv % P:
                raise ValueError(f"{what}: the group size ({P}) must divide the query heads "
                                 f"H={H} and the kv heads Hkv={Hkv} (DeepSpeed's even head "
                                 "split)")
            row = torch.tensor([q.shape[0], q.shape[1], H, Hkv, q.shape[3],
                                _comm.DTYPE_CODES.get(q.dtype, 0),
                                _comm.DEVICE_CODES.get(q.device.type, 2)], dtype=torch.int64)
        except ValueError as e:
            error = e
        rows = _comm.gather_rows(row, len(self.AGREEMENT), self.group, what=what,
                                 local_error=error)
        _comm.check_same(rows, self.AGREEMENT, what=what)
        attn = DistributedAttention(self._local, self.group, scatter_idx=2, gather_idx=1)
        return attn(q, k, v, 0)                                                # batch dim 0

    def extra_repr(self):
        return f"sdpa_backend={self.sdpa_backend!r}"


def ulysses_dense_attention(config, layer_idx: int, group) -> UlyssesDenseAttention:
    """DeepSpeed-Ulysses over dense SDPA for layer ``layer_idx`` of a GPT of ``config``
    (a factory for :func:`dist_sparse_attn.model.parallelize`). Raises ValueError unless
    ``config.attention`` is "dense": it is the dense baseline."""
    if config.attention != "dense":
        raise ValueError("strategy 'ds-ulysses' is the dense baseline: use it with "
                         "attention='dense' (the library's 'ulysses' strategy runs the "
                         f"sparse kernels after the same head exchange), got "
                         f"attention={config.attention!r}")
    return UlyssesDenseAttention(group, sdpa_backend=config.sdpa_backend)


__all__ = ["deepspeed_sequence_parallel_group", "DeepSpeedSparseAttention",
           "UlyssesLocalSparseAttention", "ulysses_sparse_attention", "ulysses_lsh_buckets",
           "UlyssesDenseAttention", "ulysses_dense_attention"]
