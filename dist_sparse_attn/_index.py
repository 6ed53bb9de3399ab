"""Integer positions that stay 64-bit under ``torch.compile``.

Inductor turns ``torch.arange`` into an index expression of the generated kernel and,
in the torch versions this package supports, computes it in the kernel's index type,
int32 for tensors under 2**31 elements, whatever dtype was asked for. Integer
arithmetic on such positions then runs in int32: the stream keys
``bucket << 32 | (pos + 2**31)`` and the keep rule's multiplicative hash fail to
compile ("Scalar 2147483648 is out of range for type int32"), and a product that fits
the literal but not the result would wrap silently. :func:`arange` is ``torch.arange``
as an opaque custom op while tracing: the positions arrive as a loaded int64 buffer
and every operation on them keeps int64. Eager calls are plain ``torch.arange``.
"""
from __future__ import annotations

import torch


@torch.library.custom_op("dist_sparse_attn::arange", mutates_args=())
def _arange_op(n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n, device=device, dtype=torch.int64)


@_arange_op.register_fake
def _arange_fake(n, device):
    return torch.empty(n, device=device, dtype=torch.int64)


def arange(n: int, device=None) -> torch.Tensor:
    """``torch.arange(n, device=device, dtype=int64)``; under ``torch.compile`` tracing
    through an opaque op, so that compiled kernels read the values as int64."""
    if torch.compiler.is_compiling():
        return _arange_op(n, torch.device("cpu" if device is None else device))
    return torch.arange(n, device=device, dtype=torch.int64)
