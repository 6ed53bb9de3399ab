"""Sparse attention inside Hugging Face ``transformers`` models.

transformers is imported lazily, inside the functions that need it: this module
imports without it.

:func:`register` adds an attention implementation to transformers'
``AttentionInterface`` (and its mask function to ``AttentionMaskInterface``), so any
model that dispatches attention through that interface (Llama, Mistral, Qwen2/3 and
most decoder-only families of transformers >= 4.53) runs the library's sparse
attention with ``attn_implementation=name``::

    from transformers import AutoModelForCausalLM
    from dist_sparse_attn.integrations.transformers import register

    register("dsa_hash", mode="hash", bucket_size=512, local_heads=2, local_window=512)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="dsa_hash")

What the attention function does with transformers' arguments:

* q (B, H, N, D) and k/v (B, Hkv, N, D) are used as views in the library's layout
  (B, N, heads, D); GQA/MQA kv heads are not repeated. ``scaling`` is the softmax scale.
* Padding: the registered mask function hands the 2-D padding mask (B, N) to the
  attention function (never an N x N mask); padded tokens are dropped (no query output,
  never attended).
* Packing: documents come from ``position_ids``: a document starts wherever a position
  is not the previous one + 1 (a reset to 0 starts a new document). Tokens of different
  documents never attend each other; within a document attention is causal by token
  order. For models that do not pass ``position_ids`` to the attention function
  (GPTBigCode, Persimmon, ...) the registered mask function hands over the documents of
  transformers' packed-sequence mask instead (a token's position is then its index in
  its document). ``cu_seq_lens_q``/``cu_seq_lens_k`` (padding-free collators), when
  given, define the documents instead.
* Under autocast the attention runs in the dtype of q/k/v (bf16 from autocast
  projections), with float32 accumulation; the LSH projections in float32.
* Refused with ValueError, never ignored: attention dropout > 0, ``softcap``,
  ``sliding_window``, attention sinks (``s_aux``/``sinks``), position biases, the keys
  of a model's own sparse-attention indexer (``indices``), non-causal attention
  (``is_causal=False``, encoders), custom or 4-D attention masks, and decoding with a
  KV cache (queries fewer than keys).

Sequence parallelism, two ways:

* DeepSpeed ALST (``deepspeed.runtime.sequence_parallel.ulysses_sp``): pass the
  registered name as ``core_attn_implementation`` to
  ``UlyssesSPAttentionHF.register_with_transformers``. After DeepSpeed's heads
  all-to-all this function sees the whole sequence and the rank's heads; it hashes
  them with their GLOBAL heads' rotations (and keeps/drops by global head index), so
  the result equals one process. ALST drops attention masks, so a padding mask raises
  ValueError there (give padding its own ``position_ids`` run and label -100 instead).
* The library's own (``group=`` at registration, or ``sp_group=`` per call): every rank
  runs the model on its contiguous shard of the sequence with GLOBAL ``position_ids``
  (as ``UlyssesSPDataLoaderAdapter`` makes them; a model that does not pass
  ``position_ids`` to its attention function raises ValueError), and attention runs through
  :func:`dist_sparse_attn.parallel.sequence_parallel_attention` (default strategy
  "bucket", which takes any head count). For :class:`HFCausalLM`, :func:`parallelize`
  sets the group and strategy once.

:func:`sharded_loss`: a rank's share of the mean next-token loss of a sharded sequence.

:func:`build_llama` builds a randomly initialised Llama-style causal LM wrapped like
:class:`dist_sparse_attn.model.GPT` (``forward(idx, targets=None, *, positions=None)
-> (logits, loss)``, ``configure_optimizers``, ``get_num_params``), and
:func:`parallelize` shards it over a process group like
:func:`dist_sparse_attn.model.parallelize`.
"""
from __future__ import annotations

import numbers
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import _validation as V
from .._index import arange
from ..hashing import local_buckets, lsh_buckets, position_keep
from ..modules import shard_offset
from ..ops import _bucketed_default_positions, hash_sparse_attention
from ..parallel import STRATEGIES, _comm, sequence_parallel_attention
from .deepspeed import _check_group, _resolve, ulysses_lsh_buckets

MODES = ("hash", "qk")
_ID_LIMIT = 2 ** 31 - 1          # bucket ids must stay below the DROP sentinel
_UNSET = object()
# arguments some models pass to the attention function whose meaning this
# implementation does not have: a value other than None raises
_UNSUPPORTED = {"softcap": "logit softcapping", "sliding_window": "a sliding window",
                "s_aux": "attention sinks", "sinks": "attention sinks",
                "position_bias": "a position bias", "block_indices": "block indices",
                "indices": "the keys a model's own indexer selects"}


@dataclass(frozen=True)
class _Options:
    mode: str
    n_buckets: int | None
    bucket_size: int | None
    seed: int
    local_heads: int
    local_window: int
    keep_rate: float
    group: object
    strategy: str
    backend: str


_REGISTERED: dict = {}          # name -> (options, attention function)


def n_buckets_for(n_tokens: int, bucket_size: int) -> int:
    """Buckets for ``n_tokens`` tokens at a target bucket size: the smallest even
    number >= 2 whose average bucket holds at most ``bucket_size`` tokens,
    ``max(2, 2 * ceil(n_tokens / (2 * bucket_size)))``."""
    return max(2, 2 * -(-int(n_tokens) // (2 * int(bucket_size))))


def _check_int(name, value, lo):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")


def register(name: str, *, mode: str = "hash", n_buckets: int | None = None,
             bucket_size: int | None = None, seed: int = 0, local_heads: int = 0,
             local_window: int = 512, keep_rate: float = 1.0, group=None,
             strategy: str = "bucket", backend: str = "auto") -> str:
    """Register sparse attention as transformers attention implementation ``name``.

    It registers an attention implementation in transformers' ``AttentionInterface``,
    with the matching mask function in ``AttentionMaskInterface``; any model that
    dispatches attention through that interface runs it with
    ``attn_implementation=name`` (in ``from_pretrained``, ``from_config`` or the config).
    Registering a name again replaces its options; the names transformers reads itself
    cannot be taken: its implementations (``"eager"``, ``"sdpa"``, ``"flash_attention_2"``,
    ``"flex_attention"``, ...), ``"paged|..."``, names holding ``"flash"`` and hub
    kernels (``"org/repo"``).

    Args:
        name: the implementation name (a non-empty string).
        mode: "hash" (angular-LSH buckets: a query attends the earlier keys of its
            bucket) or "qk" (query/key dropping by a hash of the position, see
            ``keep_rate``).
        n_buckets: mode "hash": LSH buckets per head (even, >= 2). Give this or
        bucket_size: mode "hash": target tokens per bucket instead: each document
            hashes into :func:`n_buckets_for` (its length, bucket_size) buckets, so the
            expected bucket size stays fixed as sequences grow and a short document
            packed into a long row is not spread over many near-empty buckets. The
            length counts the document's real (non-padding) tokens on all shards.
        seed: layer ``l`` (``module.layer_idx``) hashes and drops with seed ``seed + l``:
            layers differ, every rank and device agrees.
        local_heads: mode "hash": the last ``local_heads`` kv heads (and the query heads
            that read them) take block-local buckets ``position // local_window``
            (positions within the document) instead of LSH buckets: causal attention
            within aligned windows, the short-range context hashing alone misses.
        local_window: tokens per block-local window (>= 1).
        keep_rate: mode "qk": the fraction of (token, head) items kept, in (0, 1]; the
            rule of :func:`dist_sparse_attn.hashing.position_keep` on the position within
            the document (queries and keys independently, position 0 always kept):
            causal, data independent, no communication. 1.0 keeps everything (dense
            causal attention).
        group: sequence parallelism of the library: None (default: one process, or the
            head-parallel ranks of DeepSpeed ALST when it wraps this implementation),
            "auto" (DeepSpeed's sequence-parallel group at every call, none: one
            process) or a ``torch.distributed`` ProcessGroup. With a group every rank
            feeds its contiguous, non-empty shard with GLOBAL ``position_ids`` and
            registers ``name`` with the same options: each call checks them, the layer's
            seed, the strategy and the batch size in its first all_gather and raises the
            same ValueError on every rank when they differ or a shard is empty
            (transformers' own layers fail on an empty shard before attention runs;
            :class:`HFCausalLM` after :func:`parallelize` checks the shard lengths first). A call may
            override it with the keyword ``sp_group=`` (passed through the model's
            forward).
        strategy: with a group: "bucket" (default, any head count), "ulysses" or
            "allgather" (:func:`dist_sparse_attn.parallel.sequence_parallel_attention`);
            a call may override it with ``sp_strategy=``.
        backend: "auto" (Triton on CUDA, PyTorch elsewhere), "triton" or "torch".

    Returns ``name``. Raises ValueError for invalid options and ImportError when
    transformers (>= 4.53, which has ``AttentionMaskInterface``) is missing.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "hash":
        if (n_buckets is None) == (bucket_size is None):
            raise ValueError("mode='hash' needs exactly one of n_buckets and bucket_size, got "
                             f"n_buckets={n_buckets!r}, bucket_size={bucket_size!r}")
        if n_buckets is not None:
            V.check_n_buckets(n_buckets)
        else:
            _check_int("bucket_size", bucket_size, 1)
        if keep_rate != 1.0:
            raise ValueError(f"keep_rate is used by mode='qk' only, got keep_rate={keep_rate!r} "
                             "with mode='hash'")
    else:
        if n_buckets is not None or bucket_size is not None:
            raise ValueError(f"n_buckets and bucket_size are used by mode='hash' only, got "
                             f"n_buckets={n_buckets!r}, bucket_size={bucket_size!r}")
        if local_heads:
            raise ValueError(f"local_heads applies to mode='hash' only, got "
                             f"local_heads={local_heads!r}")
        if isinstance(keep_rate, bool) or not isinstance(keep_rate, numbers.Real) \
                or not 0.0 < keep_rate <= 1.0:
            raise ValueError(f"keep_rate must be a number in (0, 1], got {keep_rate!r}")
    _check_int("seed", seed, 0)
    _check_int("local_heads", local_heads, 0)
    _check_int("local_window", local_window, 1)
    _check_group("group", group)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {tuple(STRATEGIES)}, got {strategy!r}")
    V.check_backend(backend)
    opts = _Options(mode, None if n_buckets is None else int(n_buckets),
                    None if bucket_size is None else int(bucket_size), int(seed),
                    int(local_heads), int(local_window), float(keep_rate), group, strategy,
                    backend)

    AttentionInterface, AttentionMaskInterface = _interfaces()
    _check_name(name, AttentionInterface, AttentionMaskInterface)

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        if args:
            raise ValueError(f"attention implementation {name!r} takes the arguments after "
                             f"attention_mask by keyword, got {len(args)} positional")
        return _attention_outside_autocast(opts, name, module, query, key, value,
                                           attention_mask, **kwargs)

    def mask(*args, **kwargs):
        return _padding_mask(name, *args, **kwargs)

    attention.__name__ = mask.__name__ = f"dist_sparse_attn_{mode}"
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, mask)
    _REGISTERED[name] = (opts, attention)
    return name


def _check_name(name, AttentionInterface, AttentionMaskInterface):
    """Refuse the names transformers reads itself: its own implementations (registering
    one would replace it for every model of the process), "eager" (handled without the
    interface), "paged|..." (the prefix is stripped or paged), any name holding "flash"
    (transformers then applies flash-attention rules) and hub kernel names
    ("org/repo[@rev][:fn]", loaded from the hub)."""
    shipped = (set(AttentionInterface._global_mapping)
               | set(AttentionMaskInterface._global_mapping)) - set(_REGISTERED)
    if (name in shipped or name == "eager" or name.startswith("paged|") or "flash" in name
            or "/" in name or ":" in name):
        raise ValueError(f"name {name!r} is an attention implementation name transformers "
                         "reads itself (its own implementations, 'eager', 'paged|...', names "
                         "holding 'flash', hub kernels 'org/repo'); choose another name")


def _interfaces():
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as e:
        raise ImportError("dist_sparse_attn.integrations.transformers needs transformers >= "
                          "4.53 (AttentionInterface and masking_utils.AttentionMaskInterface): "
                          "pip install 'dist_sparse_attn[hf]'") from e
    return AttentionInterface, AttentionMaskInterface


# ---------------------------------------------------------------------------------------------
# the mask function
# ---------------------------------------------------------------------------------------------

def _closure(fn) -> dict:
    import inspect
    try:
        return inspect.getclosurevars(fn).nonlocals
    except TypeError:
        return {}


def _packed_documents(fn):
    """The (B, N) document indices of transformers' packed-sequence mask function
    ``and_masks(remap_positions_for_packed_sequence(causal), packed_sequence_mask_function)``,
    else None."""
    from transformers import masking_utils as mu
    parts = _closure(fn).get("mask_functions") \
        if getattr(fn, "__qualname__", "") == "and_masks.<locals>.and_mask" else None
    if not parts or len(parts) != 2:
        return None
    remap, packed = parts
    if (getattr(remap, "__qualname__", "").startswith("remap_positions_for_packed_sequence.")
            and _closure(remap).get("mask_function") is mu.causal_mask_function
            and getattr(packed, "__qualname__", "").startswith("packed_sequence_mask_function.")):
        return _closure(packed).get("packed_sequence_mask")
    return None


def _causal_or_packed(fn) -> bool:
    """Whether transformers' mask function is plain causal, or its packed-sequence form
    (:func:`_packed_documents`). Anything else (sliding or chunked windows,
    bidirectional blocks, custom overlays) is not."""
    from transformers import masking_utils as mu
    return fn is None or fn is mu.causal_mask_function or _packed_documents(fn) is not None


def _alst_group(name):
    """DeepSpeed ALST's head-parallel group when ALST wraps implementation ``name``
    (``register_with_transformers`` replaces the registered function with its own
    wrapper and keeps the group in ``parallel_state_sp``), else None."""
    state = sys.modules.get("deepspeed.runtime.sequence_parallel.parallel_state_sp")
    group = getattr(state, "_SEQUENCE_PARALLEL_GROUP", None) if state is not None else None
    if group is None or name not in _REGISTERED:
        return None
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    if ALL_ATTENTION_FUNCTIONS.get(name) is _REGISTERED[name][1]:
        return None
    return group


def _padding_mask(name, batch_size=None, q_length=None, kv_length=None, q_offset=0,
                  kv_offset=0, mask_function=None, attention_mask=None, local_size=None,
                  **kwargs):
    """The registered mask function: the 2-D padding mask (B, kv_length) bool (True =
    real token) when some token is padding; for packed sequences (transformers packs
    only without padding) the documents, (B, kv_length) int64 document index + 1 (so
    that 0 stays padding), for the models that do not pass ``position_ids`` to the
    attention function; else None. Never an N x N mask."""
    if local_size is not None:
        raise ValueError(f"attention implementation {name!r} does not support a sliding "
                         f"window (local_size={local_size}); set the model's sliding_window "
                         "to None")
    if not _causal_or_packed(mask_function):
        raise ValueError(f"attention implementation {name!r} supports causal attention "
                         "(with padding and packed sequences) only, got the mask function "
                         f"{getattr(mask_function, '__qualname__', mask_function)!r} (a "
                         "sliding, chunked, bidirectional or custom mask)")
    if q_length is not None and kv_length is not None and q_length != kv_length:
        raise ValueError(f"attention implementation {name!r} needs as many keys as queries "
                         f"(no KV-cache decoding), got {q_length} queries and {kv_length} "
                         "keys (a static or filled cache); generate with "
                         "attn_implementation='sdpa'")
    pad = None
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[1] != kv_length:
            raise ValueError(f"attention_mask must be a 2-D padding mask (B, {kv_length}), got "
                             f"shape {tuple(attention_mask.shape)}")
        pad = attention_mask.to(torch.bool)
        if bool(pad.all()):
            pad = None
    group = _alst_group(name)
    if group is not None and attention_mask is not None:
        # ALST drops masks before attention: refuse padding, on every rank together
        flag = torch.tensor([0 if pad is None else 1], device=attention_mask.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        if int(flag):
            raise ValueError(
                f"padding (attention_mask with zeros) under DeepSpeed ALST: ALST drops the "
                f"attention mask before {name!r} sees it. Give the padding its own "
                "position_ids run (a separate document, e.g. 0, 1, 2, ...) and label -100, "
                "and drop the attention_mask")
    docs = _packed_documents(mask_function)
    if docs is not None:
        docs = docs.to(torch.int64).expand(batch_size, kv_length) + 1
        return docs if pad is None else torch.where(pad, docs, 0)
    return pad


# ---------------------------------------------------------------------------------------------
# the attention function
# ---------------------------------------------------------------------------------------------

def _check_kwargs(name, module, dropout, is_causal, kwargs):
    for key, what in _UNSUPPORTED.items():
        if kwargs.get(key) is not None:
            raise ValueError(f"attention implementation {name!r} does not support {what} "
                             f"({key}={kwargs[key]!r})")
    if dropout:
        raise ValueError(f"attention implementation {name!r} does not support attention "
                         f"dropout (dropout={dropout!r}); set the model's attention_dropout "
                         "to 0")
    if is_causal is False or (is_causal is None and getattr(module, "is_causal", True) is False):
        raise ValueError(f"attention implementation {name!r} is causal only, got "
                         f"is_causal=False (encoder or bidirectional use)")


@dataclass
class _Heads:
    """Which global heads this call holds: all of them (one process, library sequence
    parallelism) or one ALST rank's share."""
    H: int                       # query heads of the model
    Hkv: int                     # kv heads of the model
    q_index: torch.Tensor        # (h,) global index of each local query head
    kv_index: torch.Tensor       # (hkv,) global index of each local kv head
    rank: int = 0                # ulysses_lsh_buckets' (rank, world) for these heads
    world: int = 1

    @property
    def split(self):
        return self.world > 1 or self.q_index.numel() != self.H


def _heads(name, module, h, hkv, device):
    cfg = getattr(module, "config", None)
    H = getattr(cfg, "num_attention_heads", None)
    Hkv = getattr(cfg, "num_key_value_heads", None) or H
    group = _alst_group(name)
    if H is None or h == H:
        return _Heads(h, hkv, arange(h, device), arange(hkv, device))
    if group is None:
        raise ValueError(f"attention implementation {name!r} got {h} of the model's {H} query "
                         "heads outside DeepSpeed ALST: head-parallel callers other than "
                         "ALST's UlyssesSPAttentionHF are not supported")
    P, r = dist.get_world_size(group), dist.get_rank(group)
    if H % P or h * P != H:
        raise ValueError(f"ALST rank holds {h} query heads, expected num_attention_heads / "
                         f"sequence-parallel size = {H} / {P}")
    q_index = arange(h, device) + r * h
    if P > Hkv:        # ALST replicates kv heads: rank r holds kv head r // (P / Hkv)
        rep = P // Hkv
        if hkv != 1:
            raise ValueError(f"ALST rank holds {hkv} kv heads, expected 1 (replicated)")
        return _Heads(H, Hkv, q_index, torch.tensor([r // rep], device=device), r // rep, Hkv)
    if hkv * P != Hkv:
        raise ValueError(f"ALST rank holds {hkv} kv heads, expected num_key_value_heads / "
                         f"sequence-parallel size = {Hkv} / {P}")
    return _Heads(H, Hkv, q_index, arange(hkv, device) + r * hkv, r, P)


@dataclass
class _Tokens:
    """Facts about this call's tokens, (B, n) tensors, and totals over the whole sequence."""
    pos: torch.Tensor              # position within the document (RoPE position)
    doc: torch.Tensor              # global document index, 0-based
    real: torch.Tensor | None      # False for padding (None: no padding)
    n_docs: int                    # documents in the longest batch row, over all shards
    doc_len: torch.Tensor | None   # real tokens of each token's document, all shards
    max_len: int                   # largest document (real tokens), over all shards
    max_pos: int                   # largest position over all shards


def _starts(pos):
    """(B, n) bool: a document starts where the position is not the previous + 1."""
    s = torch.ones_like(pos, dtype=torch.bool)
    s[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    return s


def _positions(position_ids, B, n, device):
    if position_ids is None:
        return arange(n, device).expand(B, n)
    if isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2 \
            and position_ids.shape[0] == 1:
        position_ids = position_ids[0]          # one row for the whole batch
    return V.normalize_positions("position_ids", position_ids, B, n, device)


def _docs_from_cu(cu_q, cu_k, B, n, device):
    from ..ops import _check_cu_seqlens
    if B != 1:
        raise ValueError(f"cu_seq_lens_q/cu_seq_lens_k describe one packed row, got batch size {B}")
    cq = _check_cu_seqlens("cu_seq_lens_q", cu_q, n, device)
    ck = _check_cu_seqlens("cu_seq_lens_k", cu_k if cu_k is not None else cu_q, n, device)
    if not torch.equal(cq, ck):
        raise ValueError("cu_seq_lens_q and cu_seq_lens_k must be equal (self-attention)")
    return torch.searchsorted(cq[1:], torch.arange(n, device=device), right=True)[None]


def _segment_counts(doc, real):
    """Real tokens per local document: (B, d) counts, local ids ``doc - doc[:, :1]``."""
    local = doc - doc[:, :1]
    w = torch.ones_like(local) if real is None else real.long()
    counts = torch.zeros(doc.shape[0], int(local.max()) + 1, dtype=torch.int64,
                         device=doc.device)
    return counts.scatter_add_(1, local, w), local


def _mask_parts(mask, device):
    """(real, docs) of a 2-D attention mask: a bool or 0/1 padding mask gives real =
    mask != 0 and docs None; the packed mask of :func:`_padding_mask` (document index +
    1, 0 for padding) gives its documents too."""
    mask = mask.to(device)
    if mask.dtype == torch.bool:
        return mask, None
    mask = mask.to(torch.int64)
    return mask != 0, (mask if int(mask.max()) > 1 else None)


def _local_tokens(pos, real, cu_q, cu_k, need_len, docs=None, own_pos=True):
    """_Tokens when this call holds whole sequences (one process, DeepSpeed ALST).
    ``docs``: (B, n) documents of transformers' packed mask (:func:`_mask_parts`): a
    document also starts where it changes; without the model's position_ids
    (``own_pos`` False) a token's position is then its index in its document."""
    if cu_q is not None or cu_k is not None:
        doc = _docs_from_cu(cu_q, cu_k, pos.shape[0], pos.shape[1], pos.device)
    elif docs is None:
        doc = _starts(pos).cumsum(1) - 1
    else:
        starts = _starts(pos)
        starts[:, 1:] |= docs[:, 1:] != docs[:, :-1]
        doc = starts.cumsum(1) - 1
        if not own_pos:
            index = arange(pos.shape[1], pos.device).expand_as(pos)
            pos = index - torch.where(starts, index, 0).cummax(1).values
    last_doc, max_pos = torch.stack([doc[:, -1].max(), pos.max()]).tolist()   # one sync
    doc_len, max_len = None, 0
    if need_len:
        counts, local = _segment_counts(doc, real)
        doc_len, max_len = counts.gather(1, local), int(counts.max())
    return _Tokens(pos, doc, real, last_doc + 1, doc_len, max_len, max_pos)


# what every rank of a sequence-parallel call must agree on (:func:`_agreement_row`)
_AGREEMENT = ("batch size B", "mode", "n_buckets", "bucket_size", "seed", "local_heads",
              "local_window", "keep_rate", "strategy", None)
_STRATEGY_CODES = {s: i for i, s in enumerate(STRATEGIES)}


def _agreement_row(opts, seed, strategy, B, n):
    """This rank's values of :data:`_AGREEMENT` (the registered options, the layer's seed
    and the call's strategy and batch size) and its shard length, int64."""
    return torch.tensor([B, MODES.index(opts.mode), opts.n_buckets or -1, opts.bucket_size or -1,
                         seed, opts.local_heads, opts.local_window,
                         _comm.float_bits(opts.keep_rate), _STRATEGY_CODES[strategy], n],
                        dtype=torch.int64)


def _sharded_tokens(pos, real, group, need_len, B, n, local_error=None, row=None):
    """_Tokens of this rank's contiguous shard. Documents continue across shards: two small
    all_gathers (``row`` of :func:`_agreement_row` with this rank's error flag, checked to
    agree; then :func:`_shard_stats`) give every rank the global document indices and
    lengths (:func:`_tokens_from_stats`). Every rank raises the same ValueError when a
    rank met an error, the ranks' options differ or a shard is empty."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    what = "sequence-parallel attention"
    rows = _comm.gather_rows(row, len(_AGREEMENT), group, what=what, local_error=local_error)
    _comm.check_same(rows, _AGREEMENT, what=what, floats=("keep_rate",))
    lengths = rows[:, -1].tolist()
    if 0 in lengths:
        raise ValueError(f"{what}: every rank's shard must hold tokens, got shard lengths "
                         f"{lengths} (rank order); a shard of length 0 is not supported")
    stats = _shard_stats(pos, real)
    everyone = [torch.empty_like(stats) for _ in range(world)]
    dist.all_gather(everyone, stats, group=group)
    return _tokens_from_stats(pos, real, torch.stack(everyone), rank, need_len)


def _shard_stats(pos, real):
    """Per batch row of a shard (B, 7) int64: first and last position, documents begun
    after the first token, largest position, and real tokens of the first, the last and
    the largest inner document segment."""
    starts = _starts(pos)
    counts, local = _segment_counts(starts.cumsum(1) - 1, real)
    last = local[:, -1]                                                      # (B,)
    inner = counts.scatter(1, torch.stack([torch.zeros_like(last), last], 1), 0).amax(1)
    return torch.stack([pos[:, 0], pos[:, -1], starts[:, 1:].sum(1), pos.amax(1),
                        counts[:, 0], counts.gather(1, last[:, None])[:, 0], inner], 1)


def _tokens_from_stats(pos, real, s, rank, need_len):
    """_Tokens of shard ``rank`` from every shard's :func:`_shard_stats` s (P, B, 7)."""
    world, B = s.shape[:2]
    first_start = torch.ones(world, B, dtype=torch.int64, device=pos.device)
    first_start[1:] = (s[1:, :, 0] != s[:-1, :, 1] + 1).long()              # (P, B)
    begun = first_start + s[:, :, 2]                                         # documents begun
    before = begun.cumsum(0) - begun                                         # (P, B)
    first_doc, last_doc = before + first_start - 1, before + begun - 1       # (P, B)
    # a document's length: its first-segment and last-segment parts on every rank
    first_len, last_len = s[:, :, 4], torch.where(last_doc != first_doc, s[:, :, 5], 0)

    def total(d):                                                            # (P, B) -> (P, B)
        return (((first_doc[None] == d[:, None]) * first_len[None]).sum(1)
                + ((last_doc[None] == d[:, None]) * last_len[None]).sum(1))
    first_total, last_total = total(first_doc), total(last_doc)
    starts = _starts(pos)
    starts[:, 0] = first_start[rank].bool()
    doc = before[rank][:, None] + starts.cumsum(1) - 1
    doc_len = None
    if need_len:
        counts, local = _segment_counts(doc, real)
        doc_len = counts.gather(1, local)
        doc_len = torch.where(local == 0, first_total[rank][:, None], doc_len)
        doc_len = torch.where(local == local[:, -1:], last_total[rank][:, None], doc_len)
    max_len = int(torch.stack([first_total, last_total, s[:, :, 6]]).max())
    return _Tokens(pos, doc, real, int((before[-1] + begun[-1]).max()), doc_len, max_len,
                   int(s[:, :, 3].max()))


def _position_keep(pos, heads_total, index, keep_rate, seed, salt):
    """The keep rule's masks (B, n, len(index)) for the given heads of the model's
    ``heads_total``."""
    return position_keep(pos, pos.shape[0], heads_total, keep_rate, seed, salt)[..., index]


def _lsh(q, k, nb, seed, hd: _Heads):
    if hd.split:
        return ulysses_lsh_buckets(q, k, nb, seed=seed, rank=hd.rank, world=hd.world)
    return (lsh_buckets(q, nb, seed=seed, group_size=q.shape[2] // k.shape[2]),
            lsh_buckets(k, nb, seed=seed))


def _lsh_per_document(q, k, opts, seed, tok: _Tokens, hd: _Heads):
    """LSH buckets with each document's own n_buckets (bucket_size option): the tokens of
    the documents sharing a bucket count are hashed together, one pass per count."""
    nb_tok = _n_buckets_tensor(tok.doc_len, opts.bucket_size)                 # (B, n)
    real = tok.real if tok.real is not None else torch.ones_like(nb_tok, dtype=torch.bool)
    qb = torch.full(q.shape[:3], -1, dtype=torch.int64, device=q.device)
    kb = torch.full(k.shape[:3], -1, dtype=torch.int64, device=q.device)
    for nb in torch.unique(nb_tok[real]).tolist():
        sel = (nb_tok == nb) & real
        if bool(sel.all()):
            qb, kb = _lsh(q, k, nb, seed, hd)
            break
        a, b = _lsh(q[sel][None], k[sel][None], nb, seed, hd)
        qb[sel], kb[sel] = a[0], b[0]
    return qb, kb


def _n_buckets_tensor(n_tokens, bucket_size):
    """:func:`n_buckets_for` elementwise on an integer tensor."""
    return torch.clamp(2 * torch.div(n_tokens + 2 * bucket_size - 1, 2 * bucket_size,
                                     rounding_mode="floor"), min=2)


def _buckets(opts, seed, q, k, tok: _Tokens, hd: _Heads):
    """Bucket ids (B, n, h) and (B, n, hkv) in [0, n_docs * span) or -1 (dropped), and
    n_docs * span; document d owns ids [d * span, (d + 1) * span)."""
    if opts.mode == "qk":
        qb = torch.where(_position_keep(tok.pos, hd.H, hd.q_index, opts.keep_rate, seed, 0),
                         0, -1)
        kb = torch.where(_position_keep(tok.pos, hd.Hkv, hd.kv_index, opts.keep_rate, seed, 1),
                         0, -1)
        span = 1
    else:
        if opts.n_buckets:
            span = opts.n_buckets
            qb, kb = _lsh(q, k, span, seed, hd)
        else:
            span = n_buckets_for(tok.max_len, opts.bucket_size)
            qb, kb = _lsh_per_document(q, k, opts, seed, tok, hd)
        if opts.local_heads:        # windows of the position within the document
            qb, kb = local_buckets(qb, kb, tok.pos, opts.local_heads, opts.local_window,
                                   n_kv_heads=hd.Hkv, kv_index=hd.kv_index)
            span = max(span, tok.max_pos // opts.local_window + 1)
    if tok.n_docs * span >= _ID_LIMIT:
        raise ValueError(f"{tok.n_docs} documents x {span} bucket ids per document exceed the "
                         f"bucket id range (2**31 - 1): use fewer documents per row or "
                         f"larger buckets")
    if tok.n_docs > 1:
        off = (tok.doc * span)[..., None]                                       # (B, n, 1)
        qb = torch.where(qb >= 0, qb + off, -1)
        kb = torch.where(kb >= 0, kb + off, -1)
    if tok.real is not None:
        qb = torch.where(tok.real[..., None], qb, -1)
        kb = torch.where(tok.real[..., None], kb, -1)
    return qb, kb, tok.n_docs * span


def _call_group(opts, sp_group):
    group = opts.group if sp_group is _UNSET else sp_group
    _check_group("sp_group", group)
    return _resolve(group)


def _attention(opts, name, module, query, key, value, attention_mask, *, dropout=0.0,
               scaling=None, is_causal=None, position_ids=None, cu_seq_lens_q=None,
               cu_seq_lens_k=None, sp_group=_UNSET, sp_strategy=None, **kwargs):
    _check_kwargs(name, module, dropout, is_causal, kwargs)
    for nm, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{nm} must be a 4-D tensor (B, heads, N, D), got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
    B, h, n, D = query.shape
    if key.shape[2] != n:
        raise ValueError(f"attention implementation {name!r} needs as many keys as queries "
                         f"(no KV-cache decoding), got {n} queries and {key.shape[2]} keys; "
                         "generate with attn_implementation='sdpa'")
    if value.shape != key.shape:
        raise ValueError(f"value shape {tuple(value.shape)} must equal key shape "
                         f"{tuple(key.shape)} (same head dim)")
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                       or attention_mask.dim() != 2):
        raise ValueError(f"attention implementation {name!r} takes a 2-D padding mask (from "
                         "its registered mask function), got "
                         f"{type(attention_mask).__name__} "
                         f"{tuple(getattr(attention_mask, 'shape', ()))}: a custom 4-D mask "
                         "is not supported")
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        raise ValueError(f"attention implementation {name!r} derives each layer's seed from "
                         f"module.layer_idx, which {type(module).__name__} lacks")
    seed = opts.seed + int(layer)
    V.check_scale(scaling)
    strategy = opts.strategy if sp_strategy is None else sp_strategy
    if strategy not in STRATEGIES:
        raise ValueError(f"sp_strategy must be one of {tuple(STRATEGIES)}, got {strategy!r}")
    group = _call_group(opts, sp_group)

    q, k, v = (x.transpose(1, 2) for x in (query, key, value))     # (B, n, heads, D) views
    hd = _heads(name, module, h, k.shape[2], q.device)
    if group is not None and hd.split:
        raise ValueError(f"attention implementation {name!r}: the library's sequence "
                         "parallelism (group / sp_group) and DeepSpeed ALST's head "
                         "parallelism cannot run together")
    if hd.split and (cu_seq_lens_q is not None or cu_seq_lens_k is not None):
        raise ValueError("cu_seq_lens_q/cu_seq_lens_k under DeepSpeed ALST describe one shard; "
                         "pass packed documents through position_ids")
    if group is not None and (cu_seq_lens_q is not None or cu_seq_lens_k is not None):
        raise ValueError("cu_seq_lens_q/cu_seq_lens_k are not supported with a "
                         "sequence-parallel group; pass packed documents through position_ids")
    real = docs = pos = local_error = row = None
    try:        # per-rank data: under a group, an error here is raised on every rank
        if group is not None:
            row = _agreement_row(opts, seed, strategy, B, n)
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (B, n):
                raise ValueError(f"attention_mask must have shape (B, N) = {(B, n)}, got "
                                 f"{tuple(attention_mask.shape)}")
            real, docs = _mask_parts(attention_mask, q.device)
        if group is not None and position_ids is None:
            raise ValueError(f"attention implementation {name!r} with a sequence-parallel group "
                             f"needs each shard's GLOBAL position_ids, and "
                             f"{type(module).__name__} did not pass position_ids to its "
                             "attention function")
        pos = _positions(position_ids, B, n, q.device)
    except ValueError as e:
        if group is None:
            raise
        local_error, pos = e, torch.zeros(B, n, dtype=torch.int64, device=q.device)
    need_len = opts.mode == "hash" and opts.bucket_size is not None
    with torch.no_grad():
        if group is None:
            tok = _local_tokens(pos, real, cu_seq_lens_q, cu_seq_lens_k, need_len, docs,
                                own_pos=position_ids is not None)
        else:
            tok = _sharded_tokens(pos, real, group, need_len, B, n, local_error, row)
        fast = (group is None and opts.mode == "hash" and not opts.local_heads
                and not hd.split and tok.n_docs == 1 and real is None)
        if not fast:
            qb, kb, n_ids = _buckets(opts, seed, q, k, tok, hd)
    kw = dict(softmax_scale=scaling, backend=opts.backend)
    if group is not None:
        o = sequence_parallel_attention(q, k, v, qb, kb, group=group, strategy=strategy, **kw)
    elif fast:     # the fused hashing path: the same buckets, fewer launches on CUDA
        nb = opts.n_buckets or n_buckets_for(n, opts.bucket_size)
        o = hash_sparse_attention(q, k, v, nb, seed=seed, **kw)
    else:
        o = _bucketed_default_positions(q, k, v, qb, kb, n_ids, **kw)
    return o, None                                                             # (B, n, h, D)


def _attention_outside_autocast(opts, name, module, query, key, value, attention_mask,
                                **kwargs):
    """:func:`_attention` with autocast off: the inputs' dtype (bf16 from autocast
    projections) sets the attention's precision, the LSH projections stay in float32
    (no near ties flipped by a bf16 matmul), and the PyTorch backend's own float32
    accumulation is not cast down."""
    dev = query.device.type
    if not torch.is_autocast_enabled(dev):
        return _attention(opts, name, module, query, key, value, attention_mask, **kwargs)
    # Under autocast the projections give bf16 but RoPE with the float32 cos/sin of a
    # float32 model promotes q and k back to float32 while v stays bf16. SDPA casts all
    # three to the autocast dtype; so does this (the kernels take one dtype).
    dtype = torch.get_autocast_dtype(dev)
    query, key, value = (t.to(dtype) if t.is_floating_point() else t
                         for t in (query, key, value))
    with torch.autocast(dev, enabled=False):
        return _attention(opts, name, module, query, key, value, attention_mask, **kwargs)


def sharded_loss(logits, shift_labels, group=None, ignore_index: int = -100):
    """This rank's share of the mean next-token loss of a sequence sharded over ``group``.

    logits (B, n, vocab) of this rank's shard; shift_labels (B, n): the label of each
    token, already shifted on the WHOLE sequence (the shard's last token is labelled
    with the next shard's first token, as ``UlyssesSPDataLoaderAdapter``'s
    ``shift_labels``), ``ignore_index`` where there is none. Returns the cross-entropy
    sum over this shard divided by the labelled tokens of all shards (one all_reduce of
    the count): the shares add up to the one-process mean, so backward on it gives this
    rank's part of the gradient (sum replicated parameters' gradients over the group, as
    DeepSpeed does with :class:`dist_sparse_attn.integrations.SequenceParallelMPU`).
    """
    if logits.shape[:2] != shift_labels.shape:
        raise ValueError(f"shift_labels must have shape (B, n) = {tuple(logits.shape[:2])}, "
                         f"got {tuple(shift_labels.shape)}")
    count = (shift_labels != ignore_index).sum().reshape(1)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(count, group=group)
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    total = F.cross_entropy(wide.reshape(-1, logits.shape[-1]), shift_labels.reshape(-1),
                            ignore_index=ignore_index, reduction="sum")
    return total / count[0].clamp(min=1)


# ---------------------------------------------------------------------------------------------
# a Llama-style model for the training entry point
# ---------------------------------------------------------------------------------------------

class HFCausalLM(nn.Module):
    """A transformers causal LM with the interface of :class:`dist_sparse_attn.model.GPT`.

    ``forward(idx, targets=None, *, positions=None)``: idx (B, N) int64 tokens (after
    :func:`parallelize`: this rank's contiguous shard); positions (N,) or (B, N) global
    positions (default ``arange(N)``, or after :func:`parallelize` this shard's offset +
    arange, found by an all_gather of the shard lengths). Returns logits (B, N, vocab)
    and the mean cross-entropy over the call's tokens against ``targets`` (B, N) (ignore_index
    -1; None without targets). Invalid inputs raise ValueError naming them (the checks of
    :meth:`dist_sparse_attn.model.GPT.forward`); after :func:`parallelize` on every rank,
    through one small all_gather, when one rank's are invalid or a shard is empty.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config
        self.sp_group, self.sp_strategy = None, "bucket"     # set by parallelize()

    def get_num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas=(0.9, 0.95),
                             device_type: str | None = None):
        """AdamW as :meth:`dist_sparse_attn.model.GPT.configure_optimizers`: weight decay on
        every matrix (dim >= 2), none on norms and biases; fused on CUDA."""
        from ..model import GPT
        return GPT.configure_optimizers(self, weight_decay, learning_rate, betas, device_type)

    def forward(self, idx, targets=None, *, positions=None):
        from ..model import check_inputs_on_every_rank
        check_inputs_on_every_rank(self, idx, targets, positions, self.sp_group,
                                   "HFCausalLM.forward")
        B, N = idx.shape
        kwargs = {}
        if self.sp_group is not None:     # to the registered attention function, per call
            kwargs.update(sp_group=self.sp_group, sp_strategy=self.sp_strategy)
        if positions is None:
            positions = arange(N, idx.device)
            if self.sp_group is not None:
                positions = positions + shard_offset(N, self.sp_group, idx.device)
        pos = positions.long()
        pos = (pos[None] if pos.dim() == 1 else pos).expand(B, N)
        out = self.model(input_ids=idx, position_ids=pos, use_cache=False, **kwargs)
        logits = out.logits
        loss = None
        if targets is not None:
            wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
            loss = F.cross_entropy(wide.reshape(-1, logits.size(-1)),
                                   targets.reshape(-1), ignore_index=-1)
        return logits, loss


def parallelize(model: HFCausalLM, group, strategy: str = "bucket") -> HFCausalLM:
    """The library's sequence parallelism for an :class:`HFCausalLM`, in place (as
    :func:`dist_sparse_attn.model.parallelize` for the GPT): its forward then takes this
    rank's contiguous shard of the sequence, and every attention call runs over ``group``
    with ``strategy`` ("bucket", "ulysses" or "allgather",
    :func:`dist_sparse_attn.parallel.sequence_parallel_attention`). The model's attention
    must be an implementation registered by :func:`register`. ``group`` None, or a group
    of one rank, leaves the model as it is. Returns ``model``."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {tuple(STRATEGIES)}, got {strategy!r}")
    if not _comm.shards_over(group):
        return model
    impl = model.config._attn_implementation
    if impl not in _REGISTERED:
        raise ValueError(f"sequence parallelism needs an attention implementation registered "
                         f"by dist_sparse_attn.integrations.transformers.register, the model "
                         f"has attn_implementation={impl!r}")
    model.sp_group, model.sp_strategy = group, strategy
    return model


def build_llama(vocab_size: int = 256, n_layer: int = 4, n_embd: int = 128, n_head: int = 4,
                n_kv_head: int | None = None, intermediate_size: int | None = None,
                attn_implementation: str = "sdpa", *, head_dim: int | None = None,
                rope_theta: float = 10000.0, max_position_embeddings: int = 131072,
                tie_word_embeddings: bool = True, rms_norm_eps: float = 1e-5,
                gradient_checkpointing: bool = False, dtype=None) -> HFCausalLM:
    """A randomly initialised ``LlamaForCausalLM`` (no download) wrapped as
    :class:`HFCausalLM`.

    Args:
        vocab_size, n_layer, n_embd (hidden size), n_head, n_kv_head (default n_head;
            must divide n_head), intermediate_size (MLP width, default 4 * n_embd),
            head_dim (default n_embd // n_head): the Llama shape.
        attn_implementation: "sdpa", "eager", or a name from :func:`register`.
        rope_theta, max_position_embeddings, tie_word_embeddings, rms_norm_eps: as in
            ``LlamaConfig``.
        gradient_checkpointing: recompute each decoder layer in backward (non-reentrant).
        dtype: parameter dtype (default torch's default dtype).

    The weights come from torch's global generator (seed it for identical models).
    """
    for nm, val, lo in (("vocab_size", vocab_size, 1), ("n_layer", n_layer, 1),
                        ("n_embd", n_embd, 1), ("n_head", n_head, 1)):
        _check_int(nm, val, lo)
    n_kv_head = n_head if n_kv_head is None else n_kv_head
    _check_int("n_kv_head", n_kv_head, 1)
    if n_head % n_kv_head:
        raise ValueError(f"n_kv_head={n_kv_head} must divide n_head={n_head}")
    if head_dim is None:
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} must be a multiple of n_head={n_head} "
                             "(or give head_dim)")
        head_dim = n_embd // n_head
    _check_int("head_dim", head_dim, 2)
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim} must be even (RoPE rotates pairs)")
    intermediate_size = 4 * n_embd if intermediate_size is None else intermediate_size
    _check_int("intermediate_size", intermediate_size, 1)
    if not isinstance(attn_implementation, str):
        raise ValueError(f"attn_implementation must be a string, got {attn_implementation!r}")
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=n_embd,
                         intermediate_size=intermediate_size, num_hidden_layers=n_layer,
                         num_attention_heads=n_head, num_key_value_heads=n_kv_head,
                         head_dim=head_dim, max_position_embeddings=max_position_embeddings,
                         rope_theta=rope_theta, tie_word_embeddings=tie_word_embeddings,
                         rms_norm_eps=rms_norm_eps, attention_dropout=0.0, use_cache=False,
                         attn_implementation=attn_implementation)
    model = LlamaForCausalLM(config)
    if dtype is not None:
        model = model.to(dtype)
    if gradient_checkpointing:
        kw = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):     # transformers >= 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    return HFCausalLM(model)


__all__ = ["register", "n_buckets_for", "sharded_loss", "build_llama", "HFCausalLM",
           "parallelize", "MODES"]


def build_from_config(config, *, sequence_parallel: bool = False) -> HFCausalLM:
    """The ``family="hf"`` model of a :class:`dist_sparse_attn.model.GPTConfig`: a Llama
    of its vocabulary, depth, width and heads (MLP ``intermediate_size``, or 4 * n_embd),
    RoPE base ``rope_base``, activation checkpointing per decoder layer when
    ``activation_checkpointing``, and attention as the GPT's would be:

    * "hash": this library's implementation, ``n_buckets``, seed ``hash_seed + layer``,
      ``local_heads`` block-local kv heads of ``local_window`` tokens;
    * "qk": query/key dropping at ``qk_keep_rate`` (the GPT's position-hash rule);
    * "dense": ``"sdpa"`` (``sequence_parallel=False``); for a sequence-parallel run the
      library's implementation with everything kept (``keep_rate=1.0``), which is exact
      dense causal attention over the whole sequence.

    The implementation is registered under a name derived from these settings.
    """
    name = None
    if config.attention == "hash":
        opts = dict(mode="hash", n_buckets=config.n_buckets, seed=config.hash_seed,
                    local_heads=config.local_heads, local_window=config.local_window)
    elif config.attention == "qk":
        opts = dict(mode="qk", keep_rate=config.qk_keep_rate, seed=config.hash_seed)
    elif config.attention == "dense":
        opts = None if not sequence_parallel else dict(mode="qk", keep_rate=1.0)
        name = "sdpa"
    else:
        raise ValueError(f"family='hf' supports attention 'hash', 'qk' and 'dense', got "
                         f"{config.attention!r}")
    if opts is not None:
        name = "dsa_" + "_".join(f"{k}{v}" for k, v in sorted(opts.items()))
        register(name, **opts)
    return build_llama(vocab_size=config.vocab_size, n_layer=config.n_layer,
                       n_embd=config.n_embd, n_head=config.n_head, n_kv_head=config.n_kv_head,
                       intermediate_size=config.intermediate_size or None,
                       attn_implementation=name, rope_theta=config.rope_base,
                       gradient_checkpointing=config.activation_checkpointing)
