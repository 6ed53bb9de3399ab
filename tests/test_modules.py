"""nn.Module wrappers: SparseAttention equals the functional API it dispatches to."""
from __future__ import annotations

import pytest
import torch

import dist_sparse_attn as dsa
from helpers import rand_qkv


def _grads(fn, q, k, v, g):
    xs = [x.clone().requires_grad_(True) for x in (q, k, v)]
    o = fn(*xs)
    return (o, *torch.autograd.grad(o, xs, g))


def _assert_same(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("H,Hkv", [(2, 2), (4, 1)])
def test_sparse_attention_module_matches_functional(H, Hkv):
    B, N, D = 2, 37, 16
    q, k, v = rand_qkv(B, N, N, H, Hkv, D, dtype=torch.float64)
    g = torch.randn(B, N, H, D, dtype=torch.float64)

    mod = dsa.SparseAttention("hash", 4, seed=3, backend="torch")
    _assert_same(_grads(mod, q, k, v, g),
                 _grads(lambda a, b, c: dsa.hash_sparse_attention(a, b, c, 4, seed=3,
                                                                  backend="torch"), q, k, v, g))

    q_keep, k_keep = torch.rand(B, N, H) < 0.5, torch.rand(B, N, Hkv) < 0.5
    mod = dsa.SparseAttention("qk", backend="torch")
    _assert_same(_grads(lambda a, b, c: mod(a, b, c, q_keep, k_keep), q, k, v, g),
                 _grads(lambda a, b, c: dsa.qk_sparse_attention(a, b, c, q_keep, k_keep,
                                                                backend="torch"), q, k, v, g))

    qb, kb = torch.randint(-1, 3, (B, N, H)), torch.randint(-1, 3, (B, N, Hkv))
    mod = dsa.SparseAttention("bucketed", include_self=False, backend="torch")
    _assert_same(_grads(lambda a, b, c: mod(a, b, c, q_buckets=qb, k_buckets=kb), q, k, v, g),
                 _grads(lambda a, b, c: dsa.bucketed_attention(a, b, c, qb, kb,
                                                               include_self=False,
                                                               backend="torch"), q, k, v, g))

    o = dsa.SparseAttention("dense", backend="torch")(q, k, v)
    o_ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(H // Hkv, 2).transpose(1, 2),
        v.repeat_interleave(H // Hkv, 2).transpose(1, 2), is_causal=True).transpose(1, 2)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-12)


def test_module_argument_errors():
    with pytest.raises(ValueError, match="mode"):
        dsa.SparseAttention("ring")
    with pytest.raises(ValueError, match="n_buckets"):
        dsa.SparseAttention("hash")
    with pytest.raises(ValueError, match="n_buckets"):
        dsa.SparseAttention("qk", 4)
    with pytest.raises(ValueError, match="strategy"):
        dsa.SequenceParallelSparseAttention(None, "qk", strategy="ring")
    assert dsa.SequenceParallelSparseAttention(None, "hash", 4).strategy == "bucket"
    q, k, v = rand_qkv(1, 5, 5, 2, 2, 8)
    with pytest.raises(ValueError, match="q_keep"):
        dsa.SparseAttention("qk")(q, k, v)
    with pytest.raises(ValueError, match="takes no q_keep"):
        dsa.SparseAttention("hash", 4)(q, k, v, torch.ones(1, 5, 2, dtype=torch.bool))
