"""A small GPT (nanoGPT-style) whose attention is dense, hash-sparse, QK-sparse or none.

One file, read top to bottom: config -> RoPE -> attention -> MLP -> block -> GPT ->
parallelize. Tensors use the library's FlashAttention layout inside attention: q (B, N,
H, D), k/v (B, N, Hkv, D). Each layer's attention op is one of the library's modules
(:class:`~dist_sparse_attn.modules.SparseAttention`), built from the config.

Sequence parallelism: :func:`parallelize` swaps every layer's attention op for its
sequence-parallel form (:class:`~dist_sparse_attn.modules.SequenceParallelSparseAttention`
over a process group); ``GPT.forward`` then takes this rank's contiguous shard of the
sequence (see :func:`dist_sparse_attn.data.shard_sequence`). Everything but attention is
per token, so only attention communicates; RoPE rotates each token by its GLOBAL
position, so the shards' logits equal the full sequence's.
"""
from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ._index import arange
from .graphs import GraphedCall, GraphMismatch, signature
from .modules import (SDPA_BACKENDS, SequenceParallelSparseAttention, SparseAttention,
                      dense_causal_sdpa)
from .parallel._comm import gather_rows, shards_over
from .schema import setting, validate_instance

ATTENTIONS = ("dense", "hash", "qk", "none")
SP_STRATEGIES = ("bucket", "ulysses", "allgather")
"""The library's sequence-parallel strategies (:func:`parallelize`,
:func:`dist_sparse_attn.parallel.sequence_parallel_attention`). Other sharded attentions
plug in as a factory: :func:`parallelize` also takes ``attention_for(config, layer_idx,
group) -> nn.Module``, e.g. DeepSpeed-Ulysses over dense SDPA,
:func:`dist_sparse_attn.integrations.deepspeed.ulysses_dense_attention`."""
COMPILE_MODES = ("off", "blocks", "model")
"""``GPTConfig.compile``: "off" (eager), "blocks" (``torch.compile`` of each block's
work before and after the attention call; see :func:`_block_pre`) or "model" (the
whole single-device forward in one graph, attention as the library's custom ops)."""
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
"""``GPTConfig.compile_backend``: the ``torch.compile`` backends the model accepts."""


@dataclass
class GPTConfig:
    """The model's hyperparameters. Every field's type and range is declared next to it
    (:func:`~dist_sparse_attn.schema.setting`) and checked on construction, with the
    relations between fields: a bad value raises ValueError naming the field."""
    family: str = setting("gpt", choices=("gpt", "hf"))
    """"gpt": this module's GPT. "hf": a randomly initialised Hugging Face Llama of the
    same width, depth and heads (``transformers``; MLP width ``intermediate_size``), its
    attention this library's registered implementation
    (:func:`dist_sparse_attn.integrations.transformers.build_from_config`)."""
    intermediate_size: int = setting(0, ge=0)
    """family="hf": the MLP width of the Llama; 0 = 4 * n_embd. (The GPT's is 4 * n_embd.)"""
    vocab_size: int = setting(256, ge=1)
    """Vocabulary size; 256 = raw bytes (:mod:`dist_sparse_attn.data` is byte-level)."""
    n_layer: int = setting(4, ge=1)
    """Number of transformer blocks."""
    n_head: int = setting(4, ge=1)
    """Number of query heads H."""
    n_kv_head: int | None = setting(None, ge=1)
    """Number of key/value heads Hkv (GQA/MQA); must divide n_head. None: n_head."""
    n_embd: int = setting(128, ge=2)
    """Model width; n_embd // n_head is the head dim D, which must be even (RoPE)."""
    seq_len: int = setting(256, ge=1)
    """Training sequence length (informational: RoPE needs no table of fixed size)."""
    dropout: float = setting(0.0, ge=0.0, lt=1.0)
    """Dropout on the residual branches and embeddings (not inside attention)."""
    bias: bool = setting(False)
    """Biases in the Linear layers and LayerNorms (nanoGPT's switch)."""
    attention: str = setting("dense", choices=ATTENTIONS)
    """"dense" (causal SDPA), "hash" (LSH buckets, :func:`hash_sparse_attention`),
    "qk" (query/key dropping, :func:`qk_sparse_attention`; rule in :class:`CausalSelfAttention`)
    or "none": every token attends only itself (the output is its own value vector),
    the attention-free floor of a benchmark: the same model and step with no token
    mixing, no attention kernel and no communication."""
    n_buckets: int = setting(8, ge=2)
    """LSH buckets per head for attention="hash" (even, >= 2)."""
    hash_seed: int = setting(0, ge=0, lt=2 ** 62)
    """Layer l hashes with seed ``hash_seed + l``: layers get different rotations,
    every rank and device the same ones (below 2**62, so every layer's seed is valid)."""
    local_heads: int = setting(0, ge=0)
    """attention="hash": the last ``local_heads`` kv heads (and the query heads that read
    them) take block-local buckets ``position // local_window`` instead of LSH buckets:
    chunked causal attention within aligned windows, the short-range context that
    hashing alone misses. The other heads hash as usual. 0: every head hashes."""
    local_window: int = setting(512, ge=1)
    """Window (tokens) of the block-local heads; buckets are ``global position // window``."""
    bucket_cap: float = setting(0.0, ge=0.0)
    """attention="hash": > 0 caps every (batch, kv head, bucket) at ``bucket_cap`` times the
    mean bucket size (``seq_len / n_buckets`` keys) by splitting larger buckets into
    consecutive pieces in token order (:func:`dist_sparse_attn.balance.cap_buckets`): a
    query then attends the most recent keys of its bucket's piece. Bounds the cost of a
    skewed hash (the largest bucket's tiles, the sequence-parallel owner's load).
    0: no cap."""
    qk_keep_rate: float = setting(0.5, gt=0.0, le=1.0)
    """attention="qk": fraction of the (token, head) items kept, in (0, 1]."""
    rope_base: float = setting(10000.0, gt=1.0)
    """RoPE frequency base: pair i of a head rotates by ``pos * rope_base ** (-2i / D)``."""
    activation_checkpointing: bool = setting(False)
    """Recompute each block in backward (torch.utils.checkpoint, non-reentrant)
    instead of storing its activations."""
    offload_checkpoints: bool = setting(False)
    """With ``activation_checkpointing``: keep what the blocks save for backward (their
    inputs, n_layer x tokens x n_embd) in pinned host memory instead of on the device
    (``torch.autograd.graph.save_on_cpu``), copied back when backward reaches each
    block. For the longest sequences: at 4M tokens per GPU and n_embd=768 that is 72 GiB
    of bf16 block inputs moved off the GPU, at the price of two host copies per step."""
    loss_chunk: int = setting(0, ge=0)
    """Tokens per chunk of the output head and loss. > 0: ``forward(idx, targets)``
    computes ln_f, the head, the float32 logits and the cross-entropy chunk by chunk,
    each chunk under a non-reentrant checkpoint, so no (tokens x vocab) logits of the
    whole sequence exist (the returned logits are None). 0: whole-sequence logits."""
    mlp_chunk: int = setting(0, ge=0)
    """Tokens per MLP chunk. > 0: each block's MLP runs over the sequence in chunks of this
    many tokens, each chunk under its own non-reentrant checkpoint when gradients are
    on, so a forward, a recompute or a backward holds one chunk's 4 * n_embd hidden
    activations (c_fc output, GELU output, their gradients) at a time instead of the
    whole local sequence's: at 1M tokens per GPU and n_embd=768 that is 6 GiB per such
    tensor, against 0.4 GiB for 64k-token chunks. Costs one extra MLP forward per step.
    For the longest sequences, with ``activation_checkpointing``. 0: no chunking.
    Needs ``compile="off"``."""
    sdpa_backend: str = setting("auto", choices=tuple(SDPA_BACKENDS))
    """attention="dense": the SDPA backend, "auto" (PyTorch's choice), "flash", "cudnn",
    "efficient" or "math" (the dense baselines of the benchmarks), on one device or under
    the training's sp_strategy "ds-ulysses" (the library's strategies run its own
    kernels). Any other value than "auto" needs attention="dense" and family="gpt"."""
    compile: str = setting("off", choices=COMPILE_MODES)
    """"off", or "blocks": ``torch.compile`` (default mode, no CUDA graphs, static shapes)
    of each block's per-token work around the attention call -- ln_1, the qkv projection,
    RoPE and the head reshape before it; the output projection, residual, ln_2 and MLP
    after it. The attention call itself (sparse kernels, sequence-parallel collectives,
    host syncs) stays eager, so every attention and sp strategy works. All blocks run
    the same two compiled graphs. Cuts the per-step launch overhead of small ops.
    "model": ``torch.compile`` of the whole forward (embedding to loss) as ONE graph, the
    sparse attention inside as the library's ``torch.library`` custom ops
    (:mod:`dist_sparse_attn.compile_ops`): one guard check per call instead of two per
    block. Single device only (:func:`parallelize` refuses it)."""
    cuda_graph: bool = setting(False)
    """Replay the training forward and backward from CUDA graphs
    (:class:`dist_sparse_attn.graphs.GraphedCall`): the first training call of each input
    shape warms up and captures them, every later one copies the tokens in and launches
    two graphs, so Python, autograd and thousands of small launches per step leave the
    host's critical path. Used when the model is in training mode with gradients on, on
    one CUDA device, without ``positions``; every other call (eval, no_grad, CPU) runs
    the usual forward. The parameters' gradients reach ``param.grad`` (and DeepSpeed's
    ZeRO 0-2) as after an eager backward. Single device (:func:`parallelize` refuses
    it), and no activation checkpointing, ``mlp_chunk`` or ``loss_chunk`` (their
    checkpoints save and restore the RNG state on the host, which a replay would not
    redo). Each call's backward must run before the next call; a captured shape holds
    its step's activations in the graphs' memory pool for the model's lifetime."""
    compile_backend: str = setting("inductor", choices=COMPILE_BACKENDS)
    """The ``torch.compile`` backend of ``compile``: "inductor" (default), or "aot_eager" /
    "eager" to tell a tracing problem from an inductor one, or where no C++ compiler is
    available."""

    def __post_init__(self):
        validate_instance(self)         # every field's type and range (the settings above)
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError(f"n_embd={self.n_embd} must be n_head={self.n_head} times an "
                             "even head dim (RoPE rotates pairs)")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        if self.attention == "hash" and self.n_buckets % 2:
            raise ValueError(f"n_buckets must be even and >= 2 for attention='hash', "
                             f"got {self.n_buckets}")
        if self.local_heads > self.n_kv_head:
            raise ValueError(f"local_heads={self.local_heads} must be in [0, n_kv_head="
                             f"{self.n_kv_head}]")
        if self.local_heads and self.attention != "hash":
            raise ValueError("local_heads applies to attention='hash' only, got "
                             f"attention={self.attention!r}")
        if self.bucket_cap and (self.bucket_cap < 1 or self.attention != "hash"):
            raise ValueError(f"bucket_cap={self.bucket_cap} must be 0 (off) or >= 1 (times the "
                             f"mean bucket size), with attention='hash'")
        if self.sdpa_backend != "auto" and (self.attention != "dense" or self.family == "hf"):
            raise ValueError(f"sdpa_backend={self.sdpa_backend!r} applies to attention='dense' "
                             f"of family='gpt' only (nothing else runs SDPA), got attention="
                             f"{self.attention!r}, family={self.family!r}")
        if self.offload_checkpoints and not self.activation_checkpointing:
            raise ValueError("offload_checkpoints needs activation_checkpointing=True (what it "
                             "offloads are the checkpointed blocks' inputs)")
        if self.family == "hf":
            bad = [f"{name}={getattr(self, name)!r}" for name, off in (
                ("attention", "none"), ("bucket_cap", 0.0), ("offload_checkpoints", False),
                ("loss_chunk", 0), ("mlp_chunk", 0), ("compile", "off"), ("dropout", 0.0),
                ("bias", False), ("cuda_graph", False))
                if (getattr(self, name) == off) == (name == "attention")]
            if bad:
                raise ValueError(f"family='hf' (a transformers Llama) does not support "
                                 f"{', '.join(bad)}")
        if self.cuda_graph:
            bad = [f"{name}={getattr(self, name)!r}" for name in (
                "activation_checkpointing", "mlp_chunk", "loss_chunk") if getattr(self, name)]
            if bad:
                raise ValueError(f"cuda_graph=True does not work with {', '.join(bad)} (their "
                                 f"checkpoints save and restore the RNG state on the host, "
                                 f"which a graph replay would not redo)")
        if self.mlp_chunk and self.compile != "off":
            raise ValueError(f"mlp_chunk={self.mlp_chunk} needs compile='off' (the chunks' "
                             f"checkpoints are eager), got compile={self.compile!r}")


# ---------------------------------------------------------------------------------------------
# rotary positions
# ---------------------------------------------------------------------------------------------

def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float = 10000.0):
    """cos, sin of shape (B or 1, N, 1, D/2) float32 for integer positions (N,) or (B, N)."""
    pos = positions.float()
    if pos.dim() == 1:
        pos = pos[None]                                                        # (1, N)
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32)
                        / head_dim)
    ang = pos[..., None] * inv_freq                                            # (B, N, D/2)
    return ang.cos()[:, :, None], ang.sin()[:, :, None]                        # (B, N, 1, D/2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x[..., :D/2], x[..., D/2:]) of x (B, N, heads, D) by the angles.

    Computed in x's dtype (cos/sin are cast to it; the angles themselves are float32):
    under bf16 training a float32 round trip cost two extra memory passes per call,
    measured ~10 % of a GPT-2-small step at 16k tokens on an H100."""
    x1, x2 = x.chunk(2, dim=-1)                                                # (B, N, h, D/2)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)       # (B, N, h, D)


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"{type(x).__name__} {x!r}"[:80]


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------

def core_attention(config: GPTConfig, layer_idx: int = 0, group=None, strategy="bucket"):
    """Layer ``layer_idx``'s attention op (q, k, v -> o) for ``config``: a
    :class:`~dist_sparse_attn.modules.SparseAttention` on one device (``group`` None),
    else the same attention sharded over ``group`` with ``strategy`` (:data:`SP_STRATEGIES`;
    see :func:`parallelize`). Layer l hashes and drops with seed ``hash_seed + l``."""
    opts = dict(seed=config.hash_seed + layer_idx)
    if config.attention == "hash":
        opts.update(n_buckets=config.n_buckets, local_heads=config.local_heads,
                    local_window=config.local_window, bucket_cap=config.bucket_cap)
    elif config.attention == "qk":
        opts.update(keep_rate=config.qk_keep_rate)
    if group is None:
        sdpa = config.sdpa_backend if config.attention == "dense" else None
        return SparseAttention(config.attention, sdpa_backend=sdpa, **opts)
    return SequenceParallelSparseAttention(group, config.attention, strategy=strategy, **opts)


class CausalSelfAttention(nn.Module):
    """Causal self-attention with GQA and RoPE; the attention op (``core_attn``, a module
    of :mod:`dist_sparse_attn.modules`) is chosen by the config:

    * ``"dense"``: ``F.scaled_dot_product_attention(is_causal=True)`` (backend
      ``sdpa_backend``) on one device; through the sequence-parallel op with every
      bucket 0 when sharded.
    * ``"hash"``: angular LSH buckets of the rotated q and k (seed ``hash_seed + layer``);
      a query attends the earlier keys of its bucket. The buckets are taken AFTER
      RoPE, so they depend on absolute positions (a shifted sequence hashes
      differently), which is why sequence-parallel shards need global positions.
      ``local_heads`` block-local heads, ``bucket_cap``: see :class:`GPTConfig`.
    * ``"qk"``: query/key dropping by position hash
      (:func:`~dist_sparse_attn.hashing.position_keep`): each (token, head) is kept with
      probability ``qk_keep_rate``, decided from its global position and the layer's
      seed only (queries and keys independently), plus the token at position 0. Causal
      and local: what is dropped never depends on other tokens, so nothing leaks from
      the future and shards decide alone. Dropped queries output 0 (their residual
      stream passes through unchanged).
    * ``"none"``: each token's output is its own value vector.
    """

    def __init__(self, config: GPTConfig, layer_idx: int = 0):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        kv_dim = self.n_kv_head * self.head_dim
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + 2 * kv_dim, bias=config.bias)
        self.core_attn = core_attention(config, layer_idx)    # parallelize() may swap it
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, positions=None):
        q, k, v = self.qkv(x, cos, sin)
        return self.out(self.core_attn(q, k, v, positions=positions))

    def qkv(self, x, cos, sin):
        """x (B, N, C) -> rotated q (B, N, H, D), k (B, N, Hkv, D) and v (B, N, Hkv, D).
        Per token: compiled with the block under ``GPTConfig.compile="blocks"``."""
        B, N, C = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.c_attn(x).split([H * D, Hkv * D, Hkv * D], dim=2)
        q = apply_rope(q.view(B, N, H, D), cos, sin)                           # (B, N, H, D)
        k = apply_rope(k.view(B, N, Hkv, D), cos, sin)                         # (B, N, Hkv, D)
        v = v.view(B, N, Hkv, D)                                               # (B, N, Hkv, D)
        return q, k, v

    def out(self, y):
        """Attention output y (B, N, H, D) -> the residual branch (B, N, C)."""
        B, N = y.shape[:2]
        return self.resid_dropout(self.c_proj(y.reshape(B, N, -1)))           # (B, N, C)

    def draw_rotations(self, device):
        """Put this layer's LSH rotations (query and key side) in the hashing cache."""
        self.core_attn.draw_rotations(self.n_head, self.n_kv_head, self.head_dim, device)


class MLP(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.chunk = config.mlp_chunk

    def _mlp(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))

    def forward(self, x):
        """x (B, N, C). With ``chunk`` < N: the tokens in chunks (GPTConfig.mlp_chunk)."""
        if not self.chunk or x.shape[1] <= self.chunk:
            return self._mlp(x)
        parts = x.split(self.chunk, dim=1)
        if torch.is_grad_enabled():     # keep only each chunk's input; recompute its hidden
            return torch.cat([checkpoint(self._mlp, p, use_reentrant=False) for p in parts], 1)
        return torch.cat([self._mlp(p) for p in parts], 1)


def _block_pre(block: "Block", x, cos, sin):
    """A block's work before attention: ln_1, qkv projection, RoPE -> q, k, v."""
    return block.attn.qkv(block.ln_1(x), cos, sin)


def _block_post(block: "Block", x, y):
    """A block's work after attention: output projection, residual, ln_2, MLP, residual."""
    x = x + block.attn.out(y)
    return x + block.mlp(block.ln_2(x))


_COMPILED: dict = {}


def _compiled(fn, backend: str):
    """``torch.compile(fn, backend=backend)``, made once per process (per backend). Used
    on functions that take the module as an argument (:func:`_block_pre`,
    :func:`_block_post`, :func:`_model_forward`), not on modules: dynamo treats the
    parameters as graph inputs (torch >= 2.5 inlines nn.Modules), so every block of the
    same shapes reuses one graph instead of recompiling per layer; ``dynamic=False``
    keeps the shapes static (one graph per sequence length)."""
    key = (fn, backend)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, backend=backend, dynamic=False)
    return _COMPILED[key]


class Block(nn.Module):

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)
        self.compile_mode = config.compile   # (nn.Module.compile is a method)
        self.compile_backend = config.compile_backend

    def forward(self, x, cos, sin, positions=None):
        pre, post = _block_pre, _block_post
        if self.compile_mode == "blocks":
            pre, post = (_compiled(pre, self.compile_backend),
                         _compiled(post, self.compile_backend))
        q, k, v = pre(self, x, cos, sin)
        y = self.attn.core_attn(q, k, v, positions=positions)                 # eager, always
        return post(self, x, y)


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------

class GPT(nn.Module):
    """Decoder-only transformer: token embedding (tied with the head), RoPE, pre-LN blocks."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self._graphs: dict = {}     # cuda_graph: input signature -> GraphedCall
        self.transformer.wte.weight = self.lm_head.weight   # weight tying
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():   # GPT-2: scaled init of the residual projections
            if pn.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None, *, positions=None):
        """Logits and loss.

        Args:
            idx: (B, N) integer tokens: the whole sequence, or after :func:`parallelize`
                this rank's contiguous shard (ranks in group order hold consecutive
                slices).
            targets: (B, N) integer next tokens (same sharding as idx; -1: ignored), or
                None.
            positions: (N,) or (B, N) global positions for RoPE (and the attention's
                position rules: block-local windows, the qk rule). Default ``arange(N)``;
                after :func:`parallelize` this shard's offset + arange, the offset found
                by an all_gather of the shard lengths (pass positions, e.g. from
                ``shard_sequence``, to skip it). Causality always follows the token
                order (the global index under sequence parallelism); positions only set
                the rotation and the position rules.

        Returns:
            logits (B, N, vocab_size) float (None when ``loss_chunk`` chunks the loss), and
            loss: the mean cross-entropy over this call's tokens (None without targets).
            Under sequence parallelism this is the LOCAL mean; the caller averages it
            across ranks (weighted by shard length when shards differ) -- gradients flow
            between ranks through attention.

        Raises ValueError for invalid idx, targets or positions; after :func:`parallelize`
        on every rank (one small all_gather of the checks' outcome), also for an empty
        shard.
        """
        if not torch.compiler.is_compiling():
            check_inputs_on_every_rank(self, idx, targets, positions,
                                       getattr(self.transformer.h[0].attn.core_attn, "group",
                                               None), "GPT.forward")
        if self.config.cuda_graph and self.training and torch.is_grad_enabled() \
                and idx.is_cuda and positions is None and not torch.compiler.is_compiling():
            return self._graphed_forward(idx, targets)
        return self._any_forward(idx, targets, positions)

    def _any_forward(self, idx, targets, positions):
        """The forward, compiled as one graph under ``compile="model"``, else eager."""
        if self.config.compile == "model" and not torch.compiler.is_compiling():
            self._draw_rotations(idx.device)       # cached before tracing (no graph break)
            return _compiled(_model_forward, self.config.compile_backend)(self, idx, targets,
                                                                          positions)
        return self._forward(idx, targets, positions)

    def _graphed_forward(self, idx, targets):
        """``forward`` replayed from CUDA graphs (``GPTConfig.cuda_graph``): one
        :class:`GraphedCall` per input shape, captured on first use, captured again when
        the parameters have moved (``.to()``, a new optimizer's flat buffers)."""
        inputs = (idx,) if targets is None else (idx, targets)
        key = signature(inputs)
        graphs = self._graphs
        call = graphs.get(key)
        if call is not None:
            try:
                call.check(inputs)
            except GraphMismatch:
                call = None
        if call is None:
            graphs.pop(key, None)           # free the old pool before capturing anew
            self._draw_rotations(idx.device)    # cached before the capture

            def step(idx, targets=None):
                logits, loss = self._any_forward(idx, targets, None)
                return (logits,) if loss is None else (logits, loss)

            try:
                call = graphs[key] = GraphedCall(step, self, inputs)
            except Exception as e:
                raise RuntimeError(f"GPTConfig.cuda_graph: capturing the training step "
                                   f"failed ({type(e).__name__}: {e}); train with "
                                   f"cuda_graph=False") from e
        out = call(*inputs)
        return out[0], (out[1] if len(out) > 1 else None)

    def _draw_rotations(self, device):
        """Every layer's LSH rotations in the hashing cache (before tracing or capture)."""
        for block in self.transformer.h:
            block.attn.draw_rotations(device)

    def _check_inputs(self, idx, targets, positions):
        """ValueErrors for inputs that would otherwise fail deep inside (or, for float
        positions, be read silently): shapes and integer dtypes; on the CPU also the
        token ids' range (on a GPU that check would cost a device sync every step, and
        an id out of range stops at PyTorch's own device-side assert)."""
        def integer(t):
            return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)

        if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or not integer(idx):
            raise ValueError(f"idx must be a (B, N) integer tensor of token ids, got "
                             f"{_describe(idx)}")
        vocab = self.config.vocab_size
        tensors = {"idx": idx}
        if targets is not None:
            if not isinstance(targets, torch.Tensor) or tuple(targets.shape) != tuple(idx.shape) \
                    or not integer(targets):
                raise ValueError(f"targets must be None or an integer tensor of idx's shape "
                                 f"{tuple(idx.shape)}, got {_describe(targets)}")
            tensors["targets"] = targets
        if positions is not None:
            B, N = idx.shape
            if not isinstance(positions, torch.Tensor) or not integer(positions) \
                    or tuple(positions.shape) not in ((N,), (B, N)):
                raise ValueError(f"positions must be None or an integer tensor of shape (N,) = "
                                 f"({N},) or (B, N) = {(B, N)}, got {_describe(positions)}")
        for name, t in tensors.items():
            if t.device.type == "cpu" and t.numel():
                lo, hi = int(t.min()), int(t.max())
                low = -1 if name == "targets" else 0        # -1: an ignored target
                if lo < low or hi >= vocab:
                    raise ValueError(f"{name} must hold ids in [{low}, vocab_size={vocab}), got "
                                     f"values in [{lo}, {hi}]")

    def _forward(self, idx, targets, positions):
        # any integer dtype _check_inputs accepts: the embedding takes int32/int64 ids only,
        # the cross-entropy int64 targets only (int32 targets raised a RuntimeError there)
        if idx.dtype not in (torch.int32, torch.int64):
            idx = idx.long()
        if targets is not None and targets.dtype != torch.int64:
            targets = targets.long()
        B, N = idx.shape
        if positions is None:   # sharded: this shard's, found once for every layer
            positions = self.transformer.h[0].attn.core_attn.shard_positions(N, idx.device)
        # (on one device positions stay None unless given: attention then knows they are
        # arange(N), which lets the block-local heads sort by counting)
        rope_positions = arange(N, idx.device) if positions is None else positions
        cos, sin = rope_cos_sin(rope_positions, self.config.n_embd // self.config.n_head,
                                self.config.rope_base)                        # (B|1, N, 1, D/2)
        x = self.transformer.drop(self.transformer.wte(idx))                   # (B, N, C)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)        # once, not in every layer
        checkpointing = self.config.activation_checkpointing and torch.is_grad_enabled()
        offload = torch.autograd.graph.save_on_cpu(pin_memory=idx.is_cuda) \
            if checkpointing and self.config.offload_checkpoints else contextlib.nullcontext()
        with offload:
            for block in self.transformer.h:
                if checkpointing:
                    x = checkpoint(block, x, cos, sin, positions, use_reentrant=False)
                else:
                    x = block(x, cos, sin, positions)
        chunk = self.config.loss_chunk
        if targets is not None and chunk and N > chunk:
            return None, self._chunked_loss(x, targets, chunk)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)                                               # (B, N, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(_upcast(logits).view(-1, logits.size(-1)),
                                   targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def _head_loss(self, x, targets):
        """Sum of the cross-entropy of one chunk x (B, n, C) against targets (B, n), and
        its count of counted targets (not -1)."""
        logits = _upcast(self.lm_head(self.transformer.ln_f(x)))              # (B, n, V)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1, reduction="sum")

    def _chunked_loss(self, x, targets, chunk: int):
        """The mean cross-entropy of ``forward`` computed ``chunk`` tokens at a time: each
        chunk's logits exist only while it is computed (and recomputed in backward, under
        a non-reentrant checkpoint), never the (B, N, vocab) logits of the sequence."""
        total = x.new_zeros((), dtype=torch.promote_types(x.dtype, torch.float32))
        grad = torch.is_grad_enabled()
        for xs, ts in zip(x.split(chunk, dim=1), targets.split(chunk, dim=1)):
            total = total + (checkpoint(self._head_loss, xs, ts, use_reentrant=False)
                             if grad else self._head_loss(xs, ts))
        return total / (targets != -1).sum().clamp(min=1)

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas=(0.9, 0.95),
                             device_type: str | None = None):
        """AdamW; weight decay on every matrix (dim >= 2: Linear, Embedding), none on
        biases and LayerNorm weights. Fused AdamW on CUDA where available."""
        params = [p for p in self.parameters() if p.requires_grad]   # tied weights once
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        if device_type is None:
            device_type = next(self.parameters()).device.type
        extra = {}
        if device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters:
            extra["fused"] = True
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)


def _upcast(logits):
    """Logits in at least float32 for the loss (bf16 logits lose the softmax's tail)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _model_forward(model: GPT, idx, targets, positions):
    """The single-device forward compiled by ``GPTConfig.compile="model"``."""
    return model._forward(idx, targets, positions)


# ---------------------------------------------------------------------------------------------
# sequence parallelism
# ---------------------------------------------------------------------------------------------

def check_inputs_on_every_rank(model, idx, targets, positions, group, what: str):
    """``GPT._check_inputs(model, ...)`` (also for a model with the GPT's interface and a
    ``config.vocab_size``); under a sequence-parallel ``group`` of > 1 ranks its outcome
    goes through ONE small all_gather, so an invalid input on one rank raises a ValueError
    on every rank (the others name it) instead of leaving them waiting in the model's
    first collective. The same exchange refuses an empty shard on any rank."""
    if not shards_over(group):
        GPT._check_inputs(model, idx, targets, positions)
        return
    row = error = None
    try:
        GPT._check_inputs(model, idx, targets, positions)
        row = torch.tensor([idx.shape[1]], dtype=torch.int64)
    except ValueError as e:
        error = e
    lengths = gather_rows(row, 1, group, what=what, local_error=error)[:, 0].tolist()
    if 0 in lengths:
        raise ValueError(f"{what}: every rank's shard must hold tokens, got shard lengths "
                         f"{lengths} (rank order); a shard of length 0 is not supported")


def parallelize(model: GPT, group, strategy="bucket") -> GPT:
    """Sequence parallelism for ``model``, in place: every layer's attention op becomes
    the same attention sharded over ``group`` (:func:`core_attention`), and
    ``model.forward`` then takes this rank's contiguous shard of the sequence (see
    :meth:`GPT.forward`). Every rank of the group must call the model together.

    Args:
        model: a :class:`GPT`.
        group: a ``torch.distributed`` process group; None, or a group of one rank,
            leaves the model as it is.
        strategy: "bucket", "ulysses" or "allgather" (the library's, see
            :func:`dist_sparse_attn.parallel.sequence_parallel_attention`), or a factory
            ``attention_for(config, layer_idx, group) -> nn.Module`` of another sharded
            attention with the interface of
            :class:`~dist_sparse_attn.modules.SequenceParallelSparseAttention` (e.g.
            :func:`dist_sparse_attn.integrations.deepspeed.ulysses_dense_attention`).

    Returns ``model``. Raises ValueError for an unknown strategy, ``compile="model"`` or
    ``cuda_graph=True`` (single-device graphs); a factory raises its own.
    """
    if not callable(strategy) and strategy not in SP_STRATEGIES:
        raise ValueError(f"strategy must be one of {SP_STRATEGIES} or a factory "
                         f"(config, layer_idx, group) -> module, got {strategy!r}")
    if not shards_over(group):
        return model
    config = model.config
    if config.cuda_graph:
        raise ValueError("cuda_graph=True captures the single-device step; sequence "
                         "parallelism needs cuda_graph=False")
    if config.compile == "model":
        raise ValueError("compile='model' compiles the single-device forward; use "
                         "compile='blocks' with sequence parallelism")
    for i, block in enumerate(model.transformer.h):
        block.attn.core_attn = (strategy(config, i, group) if callable(strategy)
                                else core_attention(config, i, group, strategy))
    return model


__all__ = ["GPTConfig", "GPT", "CausalSelfAttention", "core_attention", "parallelize",
           "rope_cos_sin", "apply_rope", "ATTENTIONS", "SP_STRATEGIES", "SDPA_BACKENDS",
           "COMPILE_MODES", "COMPILE_BACKENDS", "dense_causal_sdpa"]
