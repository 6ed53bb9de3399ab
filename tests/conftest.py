"""Test configuration shared by every test module.

Triton reads ``TRITON_INTERPRET`` when its ``@triton.jit`` functions are
defined, so the variable is set here, before any test module imports
``dist_sparse_attn`` (and with it any Triton kernel). Importing torch first is
harmless: only the kernel definitions must come after.
"""
import os


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


if "TRITON_INTERPRET" not in os.environ and not _has_cuda():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def seed():
    """Fresh random inputs in every test; the seed is printed so a failure can be replayed.

    pytest shows a failing test's captured stdout; rerun it with
    ``DSA_TEST_SEED=<seed>`` to get the same inputs.
    """
    value = os.environ.get("DSA_TEST_SEED")
    value = int(value) if value else int.from_bytes(os.urandom(4), "little")
    print(f"torch seed: {value} (replay with DSA_TEST_SEED={value})")
    torch.manual_seed(value)
    return value
