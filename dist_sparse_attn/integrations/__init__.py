"""Integrations with training frameworks.

:mod:`.deepspeed`: sparse attention for models trained with ``deepspeed.initialize``
(sequence parallelism over DeepSpeed's own sequence-parallel group, and a local
attention for DeepSpeed-Ulysses' ``DistributedAttention``, and DeepSpeed-Ulysses over
dense SDPA, the dense baseline). DeepSpeed is imported
only when one of its functions runs, so this package imports without it.

:mod:`.ds_groups`: ``SequenceParallelMPU``, the ``mpu`` to give ``deepspeed.initialize``
when training with sequence parallelism (DeepSpeed's config mesh does not reduce
gradients across sequence-parallel ranks).

:mod:`.transformers`: the sparse attention as a Hugging Face transformers attention
implementation (``register``), also under DeepSpeed ALST, and a Llama-style model with
the GPT interface (``build_llama``). Import it explicitly; transformers is imported
only when one of its functions runs.
"""
from .deepspeed import (DeepSpeedSparseAttention, UlyssesDenseAttention,
                        UlyssesLocalSparseAttention, deepspeed_sequence_parallel_group,
                        ulysses_lsh_buckets, ulysses_sparse_attention)
from .ds_groups import SequenceParallelMPU

__all__ = ["SequenceParallelMPU", "DeepSpeedSparseAttention", "UlyssesLocalSparseAttention",
           "UlyssesDenseAttention", "deepspeed_sequence_parallel_group", "ulysses_lsh_buckets",
           "ulysses_sparse_attention"]
