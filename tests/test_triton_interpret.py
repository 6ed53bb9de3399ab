"""The Triton kernels on the CPU under TRITON_INTERPRET=1 (set by conftest.py),
against the oracle: forward, lse and gradients; small sizes only (the
interpreter runs programs one after another). bf16 dots are wrong in the
interpreter, so bf16 is upcast inside the kernels there and checked on GPUs.
"""
import os

import pytest
import torch

import dist_sparse_attn as dsa
from dist_sparse_attn.layout import block_keys, kv_ranges, q_ranges
from dist_sparse_attn.plan import make_plan
from dist_sparse_attn.reference import reference_attention

from helpers import assert_close_rel

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available(),
    reason="interpreter tests run on CPU-only machines with TRITON_INTERPRET=1")


def _run(q, k, v, qb, kb, **kw):
    """Triton output, lse and gradients (random upstream on o and lse) vs the float64 oracle."""
    o, lse = dsa.bucketed_attention(q, k, v, qb, kb, return_lse=True, backend="triton", **kw)
    ro, rlse = reference_attention(q.double(), k.double(), v.double(), qb, kb,
                                   return_lse=True, **kw)
    g = torch.randn_like(ro)
    gl = torch.where(torch.isinf(rlse), 0.0, torch.randn_like(rlse))

    def loss(o_, l_):
        return (o_.double() * g).sum() + (torch.where(torch.isinf(l_), 0.0, l_).double() * gl).sum()
    got = torch.autograd.grad(loss(o, lse), (q, k, v))
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ro64, rlse64 = reference_attention(q64, k64, v64, qb, kb, return_lse=True, **kw)
    want = torch.autograd.grad(loss(ro64, rlse64), (q64, k64, v64))
    return o, lse, ro, rlse, got, want


def _rand(B, Nq, Nk, H, Hkv, D, dtype=torch.float32):
    return (torch.randn(B, Nq, H, D, dtype=dtype, requires_grad=True),
            torch.randn(B, Nk, Hkv, D, dtype=dtype, requires_grad=True),
            torch.randn(B, Nk, Hkv, D, dtype=dtype, requires_grad=True))


CASES = {
    "N1": (1, 1, 1, 2, 1, 16, 2),
    "N7-gqa": (2, 7, 7, 4, 2, 16, 3),
    "N63-mqa": (1, 63, 63, 4, 1, 32, 4),
    "Nq97-Nk70": (1, 97, 70, 2, 2, 16, 2),
    "N130-one-bucket": (1, 130, 130, 2, 2, 64, 1),
}


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("include_self", [True, False], ids=["self", "noself"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_interpreter_matches_oracle(case, causal, include_self):
    B, Nq, Nk, H, Hkv, D, nb = CASES[case]
    q, k, v = _rand(B, Nq, Nk, H, Hkv, D)
    qb = torch.randint(-1, nb, (B, Nq, H))            # -1: dropped
    kb = torch.randint(-1, nb, (B, Nk, Hkv))
    kw = dict(q_positions=torch.randperm(Nq), k_positions=torch.randperm(Nk),
              causal=causal, include_self=include_self)
    o, lse, ro, rlse, got, want = _run(q, k, v, qb, kb, **kw)
    assert_close_rel(o, ro, 1e-5, "o", atol=1e-6)
    assert torch.equal(torch.isinf(lse), torch.isinf(rlse))
    fin = ~torch.isinf(rlse)
    assert_close_rel(lse[fin], rlse[fin], 1e-5, "lse", atol=1e-6)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert_close_rel(a, b, 1e-5, name, atol=1e-6)


@pytest.mark.parametrize("D", [16, 32, 64, 128, 256, 24, 80], ids=lambda d: f"D{d}")
def test_interpreter_head_dims_fp16(D):
    q, k, v = _rand(1, 40, 40, 2, 1, D, torch.float16)
    qb = torch.randint(0, 2, (1, 40, 2))
    kb = torch.randint(0, 2, (1, 40, 1))
    o, _, ro, _, got, want = _run(q, k, v, qb, kb)
    # fp16 operands with fp32 accumulation: error of order the fp16 unit roundoff
    assert_close_rel(o, ro, 3e-3, "o", atol=1e-3)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert_close_rel(a, b, 5e-3, name, atol=1e-3)


def test_interpreter_skewed_and_empty_buckets():
    """Everything in one of 8 buckets for q, keys split over 2: most buckets empty."""
    B, N, H, D = 1, 100, 2, 16
    q, k, v = _rand(B, N, N, H, H, D)
    qb = torch.full((B, N, H), 5)
    kb = torch.where(torch.rand(B, N, H) < 0.5, 5, 6)
    o, _, ro, _, got, want = _run(q, k, v, qb, kb)
    assert_close_rel(o, ro, 1e-5, "o", atol=1e-6)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert_close_rel(a, b, 1e-5, name, atol=1e-6)


def test_interpreter_drop_everything_gives_zeros():
    q, k, v = _rand(1, 50, 50, 2, 2, 16)
    none = torch.zeros(1, 50, 2, dtype=torch.bool)
    o, lse = dsa.qk_sparse_attention(q, k, v, none, none, return_lse=True, backend="triton")
    o.sum().backward()
    assert torch.equal(o, torch.zeros_like(o)) and torch.isinf(lse).all()
    for x in (q, k, v):
        assert torch.equal(x.grad, torch.zeros_like(x.grad))


def test_interpreter_hash_sparse_equals_torch_backend():
    q, k, v = _rand(2, 90, 90, 4, 2, 32)
    a = dsa.hash_sparse_attention(q, k, v, 4, seed=7, backend="triton")
    b = dsa.hash_sparse_attention(q, k, v, 4, seed=7, backend="torch")
    assert_close_rel(a, b, 1e-5, "o", atol=1e-6)


@pytest.mark.parametrize("trial", range(12))
def test_range_kernel_matches_pytorch_ranges(trial):
    """The fused Triton block-range kernel equals layout.kv_ranges / q_ranges."""
    from dist_sparse_attn.kernels import triton_attn as ta
    B, H = 1 + trial % 2, [1, 2, 4][trial % 3]
    Hkv = [1, H][trial % 2]
    Nq, Nk = int(torch.randint(1, 300, ())), int(torch.randint(1, 300, ()))
    nb = int(torch.randint(1, 6, ()))
    q, k = torch.randn(B, Nq, H, 8), torch.randn(B, Nk, Hkv, 8)
    qb, kb = torch.randint(-1, nb, (B, Nq, H)), torch.randint(-1, nb, (B, Nk, Hkv))
    qpos, kpos = torch.randperm(Nq).expand(B, Nq), torch.randperm(Nk).expand(B, Nk)
    for causal in (True, False):
        for include_self in (True, False):
            plan = make_plan(q, k, qb, kb, qpos, kpos, causal=causal,
                             include_self=include_self, softmax_scale=None)
            for bm, bn in ((32, 64), (64, 32), (16, 16)):
                for transposed, fn in ((False, kv_ranges), (True, q_ranges)):
                    got = ta._ranges(plan, bm, bn, transposed)
                    want = fn(block_keys(plan.q_streams, bm), block_keys(plan.k_streams, bn),
                              plan.kv_of_q, causal=causal, shift=plan.shift)
                    for g, w in zip(got, want):
                        assert torch.equal(g, w), (causal, include_self, bm, bn, transposed)


@pytest.mark.parametrize("n_buckets,D,group", [(2, 16, 1), (8, 64, 2), (64, 24, 1), (40, 32, 4)],
                         ids=str)
def test_fused_lsh_kernel_matches_torch(n_buckets, D, group):
    """The fused GPU hashing kernel (run here by the interpreter) gives the
    buckets and sort keys of the PyTorch path."""
    from dist_sparse_attn.hashing import _rotations_on
    from dist_sparse_attn.kernels.triton_hash import lsh_triton
    from dist_sparse_attn.layout import bucket_keys
    B, N, heads = 2, 77, 4
    x = torch.randn(B, N, heads, D)
    want = dsa.lsh_buckets(x, n_buckets, seed=3, group_size=group)
    rot = _rotations_on(x.device, heads, D, n_buckets, 3, group)
    got = lsh_triton(x, rot, n_buckets, group, write_keys=False)
    # float32 sums in another order may flip an exact near-tie; allow 1 in 1000
    assert (got == want).float().mean() >= 0.999
    keys = lsh_triton(x, rot, n_buckets, group, write_keys=True)
    assert torch.equal(keys, bucket_keys(got, torch.arange(N).expand(B, N)))
