"""Test configuration shared by every test module.

* Triton reads ``TRITON_INTERPRET`` when its ``@triton.jit`` functions are defined, so
  the variable is set here, before any test module imports ``dist_sparse_attn`` (and
  with it any Triton kernel): without CUDA the kernels run on the CPU under Triton's
  interpreter. Importing torch first is harmless: only the kernel definitions must come
  after.
* ``tests/`` is put on ``sys.path``, so the test files of every folder import
  ``helpers``.
* Seeds: every test starts from the same seed, :func:`helpers.base_seed` (0 unless
  ``DSA_TEST_SEED`` says otherwise; the header of the run names it).
* DeepSpeed on a machine without CUDA builds a C++ op (``deepspeed_shm_comm``) the first
  time it starts torch.distributed: that build (about a minute on 2 cores) happens once
  at the start of the session, not inside the first test's time limit (a build killed
  there leaves a lock file that every later DeepSpeed start would wait on forever).
  What DeepSpeed's CPU all-reduce leaves in /dev/shm is removed at the end.
* Devices: a test that makes sense on both devices takes the ``device`` fixture (the
  PyTorch backend, or anything not tied to Triton) or the ``triton_device`` fixture
  (the Triton kernels: on the CPU only under the interpreter). Each runs once with
  "cpu" and once with "cuda"; the "cuda" run is marked ``gpu``. Tests marked ``gpu``
  (those runs and the GPU-only tests: large sizes, bfloat16 dots, NCCL) are skipped
  without CUDA. ``fused`` selects the fused backend (fused hashing, counting sort) for
  the Triton device, also on the CPU under the interpreter.
"""
import os
import sys


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


if "TRITON_INTERPRET" not in os.environ and not _has_cuda():
    os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import random  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import CUDA, base_seed, triton_runs_on  # noqa: E402

from dist_sparse_attn.distributed import deepspeed_shm_segments, remove_deepspeed_shm  # noqa: E402


def pytest_configure(config):
    try:
        base_seed()         # DSA_TEST_SEED=random: drawn once, before any worker starts
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None


def _build_deepspeed_cpu_op():
    """Build DeepSpeed's CPU communication op now if DeepSpeed is installed, there is no
    CUDA and the op is not built yet. A lock file older than 15 minutes is left from a
    build that was killed: it is removed (DeepSpeed would wait on it forever)."""
    import importlib.util
    import time

    if CUDA or importlib.util.find_spec("deepspeed") is None:
        return
    from torch.utils.cpp_extension import _get_build_directory
    build_dir = _get_build_directory("deepspeed_shm_comm", verbose=False)
    lock = os.path.join(build_dir, "lock")
    if os.path.exists(lock) and time.time() - os.path.getmtime(lock) > 15 * 60:
        print(f"removing {lock}: left by a build that did not finish", file=sys.stderr)
        os.remove(lock)
    if os.path.exists(os.path.join(build_dir, "deepspeed_shm_comm.so")):
        return
    print("building DeepSpeed's CPU communication op once (about a minute)", file=sys.stderr)
    from deepspeed.comm.torch import build_shm_op
    build_shm_op()


def pytest_sessionstart(session):
    session.config._dsa_shm_before = deepspeed_shm_segments()
    _build_deepspeed_cpu_op()


def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, "_dsa_shm_before", None)
    if before is not None:
        remove_deepspeed_shm(deepspeed_shm_segments() - before)


def pytest_report_header(config):
    return (f"test seed: {base_seed()} (DSA_TEST_SEED=<int> sets it, DSA_TEST_SEED=random "
            f"draws one)")


def pytest_collection_modifyitems(config, items):
    if CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def seed():
    """Seeds torch, numpy and random with :func:`helpers.base_seed` before every test (so
    a test's inputs do not depend on which tests ran before it) and returns it, for tests
    that hand a seed to their own generators or worker processes. The seed is printed,
    so a failing test's captured output says how to replay it."""
    value = base_seed()
    print(f"test seed: {value} (replay with DSA_TEST_SEED={value})")
    torch.manual_seed(value)
    np.random.seed(value % 2 ** 32)
    random.seed(value)
    return value


_CUDA_PARAM = pytest.param("cuda", marks=pytest.mark.gpu, id="cuda")


@pytest.fixture(params=["cpu", _CUDA_PARAM])
def device(request):
    """"cpu", and "cuda" (marked ``gpu``: skipped without CUDA)."""
    return request.param


@pytest.fixture(params=["cpu", _CUDA_PARAM])
def triton_device(request):
    """The device the Triton kernels run on: "cpu" under the interpreter (machines
    without CUDA, where conftest.py sets TRITON_INTERPRET=1; skipped elsewhere), and
    "cuda" (marked ``gpu``). Keep the CPU run small: the interpreter runs one program
    after another, and its bfloat16 dot is wrong (the kernels upcast bf16 there)."""
    if not triton_runs_on(request.param):
        pytest.skip("Triton runs on CPU tensors only under TRITON_INTERPRET=1, which "
                    "conftest.py sets on machines without CUDA")
    return request.param


@pytest.fixture
def fused(triton_device, monkeypatch):
    """(device, ran): the Triton device with the fused backend selected for it (on the CPU
    under the interpreter: ``Backend(fused=True)``, which ``kernels.select`` gives CUDA
    tensors only), and a list that records "lsh" / "sort" each time the fused hashing /
    the counting sort runs."""
    from dist_sparse_attn import kernels
    from dist_sparse_attn.kernels import triton_hash, triton_sort
    ran = []
    if triton_device == "cpu":
        monkeypatch.setattr(kernels, "select",
                            lambda backend, device, dtype=torch.float32:
                            kernels.Backend("triton", fused=True))
    lsh, sort = triton_hash.lsh_triton, triton_sort.bucket_sort_streams
    monkeypatch.setattr(triton_hash, "lsh_triton",
                        lambda *a, **kw: (ran.append("lsh"), lsh(*a, **kw))[1])
    monkeypatch.setattr(triton_sort, "bucket_sort_streams",
                        lambda *a, **kw: (ran.append("sort"), sort(*a, **kw))[1])
    return triton_device, ran
