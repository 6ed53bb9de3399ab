"""Integrations with training frameworks.

:mod:`.deepspeed`: sparse attention for models trained with ``deepspeed.initialize``
(sequence parallelism over DeepSpeed's own sequence-parallel group, and a local
attention for DeepSpeed-Ulysses' ``DistributedAttention``). DeepSpeed is imported
only when one of its functions runs, so this package imports without it.
"""
from .deepspeed import (DeepSpeedSparseAttention, UlyssesLocalSparseAttention,
                        deepspeed_sequence_parallel_group, ulysses_lsh_buckets,
                        ulysses_sparse_attention)

__all__ = ["DeepSpeedSparseAttention", "UlyssesLocalSparseAttention",
           "deepspeed_sequence_parallel_group", "ulysses_lsh_buckets", "ulysses_sparse_attention"]
