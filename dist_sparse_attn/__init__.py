"""dist_sparse_attn: sparse causal attention (hash-sparse, QK-sparse) for long sequences."""
from .hashing import keep_to_buckets, lsh_buckets
from .ops import (bucketed_attention, bucketed_attention_varlen, hash_sparse_attention,
                  qk_sparse_attention)
from .reference import reference_attention
from .modules import SequenceParallelSparseAttention, SparseAttention
from . import parallel

__version__ = "0.1.0"

__all__ = [
    "bucketed_attention",
    "bucketed_attention_varlen",
    "hash_sparse_attention",
    "qk_sparse_attention",
    "lsh_buckets",
    "keep_to_buckets",
    "reference_attention",
    "SparseAttention",
    "SequenceParallelSparseAttention",
]
