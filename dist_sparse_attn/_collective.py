"""Agreement between the ranks of a process group: small all_gathers of one int64 row
per rank, and the checks that every rank raises the same error from.

The bottom of the package's layers (it imports nothing of the package), so that any
layer that exchanges tensors between ranks (``balance``, ``parallel``, ``model``, the
integrations) compares its ranks' arguments the same way.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def all_gather_equal(t: torch.Tensor, group) -> torch.Tensor:
    """Equal-shaped ``all_gather`` -> (P, *t.shape)."""
    P = dist.get_world_size(group)
    out = [torch.empty_like(t) for _ in range(P)]
    dist.all_gather(out, t.contiguous(), group=group)
    return torch.stack(out)


def float_bits(x: float) -> int:
    """A float as the int64 with the same bits (exact comparison across ranks)."""
    return int(torch.tensor([float(x)], dtype=torch.float64).view(torch.int64))


def _bits_float(b: int) -> float:
    return float(torch.tensor([b], dtype=torch.int64).view(torch.float64))


def gather_rows(row, width: int, group, *, what: str, local_error=None) -> torch.Tensor:
    """All-gather one int64 row of ``width`` values per rank (ONE small collective) and
    return them (P, width) on the CPU.

    ``row``: this rank's values (a CPU or device int64 tensor), or None when this rank
    met ``local_error`` while building it. A local error is not raised at once (the other
    ranks would wait forever in the gather): it travels as a flag, and afterwards every
    rank raises -- the failing rank its own error, the others a ValueError naming the
    failing ranks.
    """
    ok = row is not None and local_error is None
    flag = torch.tensor([1 if ok else 0], dtype=torch.int64)
    row = torch.full((width,), -1, dtype=torch.int64) if not ok else row.to(torch.int64)
    dev = row.device
    if dist.get_backend(group) == "nccl" and dev.type != "cuda":
        dev = torch.device("cuda", torch.cuda.current_device())
    rows = all_gather_equal(torch.cat([flag.to(dev), row.to(dev)]), group).cpu()
    if local_error is not None:
        raise local_error
    bad = (rows[:, 0] != 1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"{what}: invalid inputs on rank(s) {bad} of the group (see the "
                         "error raised there)")
    return rows[:, 1:]


def check_same(rows: torch.Tensor, names, *, what: str, floats=()):
    """Raise a ValueError (the same on every rank) naming the first column of ``rows``
    (P, len(names)) whose value differs between ranks; None names are not checked."""
    for col, name in enumerate(names):
        if name is None or (rows[:, col] == rows[0, col]).all():
            continue
        values = rows[:, col].tolist()
        if name in floats:
            values = [_bits_float(b) for b in values]
        raise ValueError(f"{what}: {name} differs between ranks: {values} (rank order); "
                         "every rank of the group must pass the same value")
