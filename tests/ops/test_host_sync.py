"""No host synchronisation in the single-device attention path of the fused backend.

A CUDA graph (``torch.cuda.graphs``, ``torch.compile(mode="reduce-overhead")``) can only
capture a step that never reads a device value back on the host. The fused backend
(Triton hashing that writes sort keys, the counting sort, block ranges searched on the
device, grids sized from shapes) promises exactly that for hash and qk attention,
forward and backward, also through :class:`SparseAttention` with block-local heads, the
bucket cap and the qk keep rule.

Every host read of a tensor goes through a few ATen ops (``_local_scalar_dense`` behind
``.item()``, ``int()``, ``bool()`` and ``.tolist()``; ``nonzero``, ``masked_select`` and
``unique``, and indexing by a boolean mask, whose output shapes depend on values): a
dispatch mode records them. The ``fused`` fixture (conftest.py) selects the fused
backend: on the CPU under the Triton interpreter, on a GPU the real one.
"""
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dist_sparse_attn as dsa
from helpers import rand_qkv

_SYNCING = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
            torch.ops.aten.masked_select.default, torch.ops.aten._unique2.default,
            torch.ops.aten.unique_consecutive.default, torch.ops.aten.unique_dim.default}


# indexing with a boolean mask: the output's size is the mask's count
_INDEXING = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default,
             torch.ops.aten.index_put_.default}


def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


class HostReads(TorchDispatchMode):
    """Records every ATen op of the block that reads device values back on the host, with
    the stack that called it."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _SYNCING or (func in _INDEXING and _bool_index(args)):
            self.reads.append(f"{func}\n" + "".join(traceback.format_stack(limit=12)[:-1]))
        return func(*args, **(kwargs or {}))


def _step(fn, q, k, v):
    """fn(q, k, v) forward and backward, twice (the first call compiles and caches); the
    second under HostReads. Returns the reads."""
    for _ in range(2):
        for t in (q, k, v):
            t.grad = None
        with HostReads() as mode:
            fn(q, k, v).float().square().sum().backward()
    assert all(t.grad is not None for t in (q, k, v))
    return mode.reads


def test_detector_sees_a_host_read(fused):
    device, _ = fused
    x = torch.arange(5, device=device)
    with HostReads() as mode:
        int(x.max())
        x[x > 2]
        torch.nonzero(x)
    assert len(mode.reads) == 3, mode.reads


B, N, H, HKV, D = 1, 64, 4, 2, 16

# name: (call, hashes with the fused kernel, sorts by counting)
CALLS = {
    "hash_sparse_attention": (
        lambda q, k, v: dsa.hash_sparse_attention(q, k, v, 4, seed=3), True, True),
    "qk_sparse_attention": (
        lambda q, k, v: dsa.qk_sparse_attention(
            q, k, v, torch.arange(N, device=q.device)[None, :, None].expand(B, N, H) % 3 != 0,
            torch.arange(N, device=q.device)[None, :, None].expand(B, N, HKV) % 2 == 0),
        False, True),
    "module_hash": (dsa.SparseAttention("hash", 4, seed=1), True, True),
    "module_hash_local": (dsa.SparseAttention("hash", 4, seed=1, local_heads=1,
                                              local_window=16), True, True),
    "module_hash_cap": (dsa.SparseAttention("hash", 4, seed=1, bucket_cap=1.5), True, True),
    "module_hash_local_cap": (dsa.SparseAttention("hash", 4, seed=1, local_heads=1,
                                                  local_window=16, bucket_cap=1.5), True, True),
    "module_qk_keep_rate": (dsa.SparseAttention("qk", keep_rate=0.5, seed=2), False, True),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_no_host_sync(fused, name):
    device, ran = fused
    call, hashes, counts = CALLS[name]
    q, k, v = rand_qkv(B, N, N, H, HKV, D, device=device, requires_grad=True)
    reads = _step(call, q, k, v)
    assert not reads, f"{len(reads)} host read(s) in {name}; the first:\n{reads[0]}"
    assert ("lsh" in ran, "sort" in ran) == (hashes, counts), ran


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["hash_sparse_attention", "module_hash_local_cap",
                                  "module_qk_keep_rate"])
def test_cuda_graph_replays_the_eager_step(name):
    """Forward and backward captured in CUDA graphs (``torch.cuda.make_graphed_callables``)
    and replayed on new inputs give the eager outputs and gradients."""
    call = CALLS[name][0]
    dtype = torch.bfloat16
    q, k, v = rand_qkv(2, 1024, 1024, H, HKV, 64, dtype=dtype, device="cuda",
                       requires_grad=True)
    graphed = torch.cuda.make_graphed_callables(call, (q, k, v))
    for _ in range(2):      # new inputs each time: the graph reads the static copies
        x = [t.detach().normal_().requires_grad_() for t in (q, k, v)]
        y = [t.detach().clone().requires_grad_() for t in x]
        g = torch.randn(2, 1024, H, 64, device="cuda", dtype=dtype)
        out = graphed(*x)
        out.backward(g)
        want = call(*y)
        want.backward(g)
        assert torch.equal(out, want)
        for a, b in zip(x, y):
            assert torch.equal(a.grad, b.grad)
