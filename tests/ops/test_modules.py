"""nn.Module wrappers: SparseAttention equals the functional API it dispatches to, and
its bucket rules (block-local heads, bucket cap, keep rate, dense SDPA, "none") equal
the float64 oracle ``reference_attention`` on buckets built here from the rules."""
from __future__ import annotations

import pytest
import torch

import dist_sparse_attn as dsa
from helpers import assert_close_rel, rand_qkv


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
    with pytest.raises(ValueError, match="needs q_keep .*keep_rate"):
        dsa.SparseAttention("qk")(q, k, v)
    with pytest.raises(ValueError, match="needs q_buckets$"):
        dsa.SparseAttention("bucketed")(q, k, v)
    with pytest.raises(ValueError, match="takes no q_keep"):
        dsa.SparseAttention("hash", 4)(q, k, v, torch.ones(1, 5, 2, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------
# the rules the modules make buckets with (what the GPT's attention is built on)
# ---------------------------------------------------------------------------------------------

def _ref(q, k, v, qb, kb, **kw):
    return dsa.reference_attention(q, k, v, qb, kb, **kw).to(q.dtype)


@pytest.mark.parametrize("shift", [0, 21])
def test_hash_local_heads_and_cap_match_reference(shift):
    """local_heads: the last kv head (and its query heads) in buckets position // window, by
    the GIVEN positions (shifted windows straddle differently); bucket_cap: cap_buckets at
    ceil(cap * N / n_buckets) keys (6 here: every window of 20 tokens is split); equal to
    the float64 oracle on those buckets."""
    import math

    from dist_sparse_attn.balance import cap_buckets
    B, N, H, Hkv, D, nb, win = 2, 45, 6, 3, 8, 8, 20
    q, k, v = rand_qkv(B, N, N, H, Hkv, D, dtype=torch.float64)
    pos = torch.arange(N) + shift
    qb = dsa.lsh_buckets(q, nb, seed=5, group_size=2)
    kb = dsa.lsh_buckets(k, nb, seed=5)
    qb[..., 4:] = kb[..., 2:] = (pos // win)[None, :, None]
    local = dsa.SparseAttention("hash", nb, seed=5, local_heads=1, local_window=win,
                                backend="torch")
    got = local(q, k, v, positions=pos if shift else None)
    torch.testing.assert_close(got, _ref(q, k, v, qb, kb), rtol=1e-10, atol=1e-12)
    assert torch.equal(local.buckets(q, k, pos)[0], qb)
    capped = dsa.SparseAttention("hash", nb, seed=5, local_heads=1, local_window=win,
                                 bucket_cap=1.0, backend="torch")
    cqb, ckb = cap_buckets(qb, kb, math.ceil(1.0 * N / nb))
    want = _ref(q, k, v, cqb, ckb)
    torch.testing.assert_close(capped(q, k, v, positions=pos), want, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(want, got)        # the cap changed something
    with pytest.raises(ValueError, match="non-negative"):
        local(q, k, v, positions=pos - 30)
    with pytest.raises(ValueError, match="local_heads=4 exceeds"):
        dsa.SparseAttention("hash", nb, local_heads=4)(q, k, v)


@pytest.mark.parametrize("local_heads,cap", [(1, 0.0), (0, 1.5), (1, 1.0)],
                         ids=["local", "cap", "local_cap"])
def test_rules_on_the_fused_backend_match_reference(fused, local_heads, cap):
    """Block-local heads and the cap on the fused backend (on the CPU under the
    interpreter): the module promises its ids' bound, the counting sort orders them (it
    must run), and the result is the float64 oracle's on the module's buckets."""
    triton_device, ran = fused
    B, N, H, Hkv, D = 1, 70, 4, 2, 16
    q, k, v = rand_qkv(B, N, N, H, Hkv, D, device=triton_device)
    attn = dsa.SparseAttention("hash", 4, seed=3, local_heads=local_heads, local_window=16,
                               bucket_cap=cap)
    got = attn(q, k, v)
    assert "sort" in ran, "the counting sort did not run"
    qb, kb = attn.buckets(q, k)
    want = dsa.reference_attention(q.double(), k.double(), v.double(), qb, kb)
    assert_close_rel(got, want, 1e-5, "o")


def test_qk_keep_rate_is_the_position_rule():
    """keep_rate: queries kept by position_keep(salt 0), keys by salt 1, of the GIVEN
    global positions (a shard decides like the whole sequence)."""
    from dist_sparse_attn.hashing import position_keep
    B, N, H, Hkv, D = 2, 40, 4, 2, 8
    q, k, v = rand_qkv(B, N, N, H, Hkv, D, dtype=torch.float64)
    pos = torch.arange(N) + 13
    q_keep = position_keep(pos, B, H, 0.4, 9, 0)
    k_keep = position_keep(pos, B, Hkv, 0.4, 9, 1)
    mod = dsa.SparseAttention("qk", seed=9, keep_rate=0.4, backend="torch")
    want = _ref(q, k, v, dsa.keep_to_buckets(q_keep), dsa.keep_to_buckets(k_keep))
    torch.testing.assert_close(mod(q, k, v, positions=pos), want, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(mod(q, k, v), want)           # default positions: arange(N)
    with pytest.raises(ValueError, match="takes no q_keep"):
        mod(q, k, v, q_keep, k_keep)


def test_dense_sdpa_and_none():
    """sdpa_backend: dense causal SDPA (the oracle with every bucket 0, softmax_scale
    honoured); mode "none": each token's output is its own value vector."""
    B, N, H, Hkv, D = 2, 33, 4, 2, 8
    q, k, v = rand_qkv(B, N, N, H, Hkv, D, dtype=torch.float64)
    zq, zk = torch.zeros(B, N, H, dtype=torch.long), torch.zeros(B, N, Hkv, dtype=torch.long)
    # a zero or negative scale too (PyTorch's CPU flash kernel gives NaN for those)
    for backend, scale in (("auto", 0.3), ("math", 0.3), ("auto", -0.7), ("auto", 0.0),
                           ("math", -0.7)):
        sdpa = dsa.SparseAttention("dense", sdpa_backend=backend, softmax_scale=scale)
        torch.testing.assert_close(sdpa(q, k, v), _ref(q, k, v, zq, zk, softmax_scale=scale),
                                   rtol=1e-10, atol=1e-12)
    if not q.is_cuda:       # PyTorch has no CPU kernel for these: a ValueError naming them
        for backend in ("cudnn", "efficient"):
            with pytest.raises(ValueError, match=f"SDPA backend '{backend}' cannot run"):
                dsa.SparseAttention("dense", sdpa_backend=backend)(q, k, v)
    o = dsa.SparseAttention("none")(q, k, v, positions=torch.arange(N) + 4)
    torch.testing.assert_close(o, v.repeat_interleave(2, dim=2), rtol=0, atol=0)
    assert torch.equal(o[:, :, 1], v[:, :, 0]) and torch.equal(o[:, :, 2], v[:, :, 1])


def test_rule_option_errors():
    for kw, text in [(dict(mode="qk", local_heads=1), "local_heads applies"),
                     (dict(mode="hash", n_buckets=4, local_window=0), "local_window"),
                     (dict(mode="hash", n_buckets=4, bucket_cap=0.5), "bucket_cap must be"),
                     (dict(mode="dense", bucket_cap=2.0), "bucket_cap applies"),
                     (dict(mode="qk", keep_rate=0.0), "keep_rate must be"),
                     (dict(mode="hash", n_buckets=4, keep_rate=0.5), "keep_rate applies"),
                     (dict(mode="dense", sdpa_backend="fast"), "sdpa_backend must be"),
                     (dict(mode="hash", n_buckets=4, sdpa_backend="math"), "sdpa_backend applies"),
                     (dict(mode="dense", sdpa_backend="math", causal=False), "causal=True"),
                     (dict(mode="dense", sdpa_backend="math", backend="torch"), "backend"),
                     (dict(mode="none", include_self=False), "always includes self")]:
        with pytest.raises(ValueError, match=text):
            dsa.SparseAttention(**kw)
    with pytest.raises(TypeError):      # SDPA is one device only
        dsa.SequenceParallelSparseAttention(None, "dense", sdpa_backend="math")
    with pytest.raises(ValueError, match="makes no buckets"):
        dsa.SparseAttention("bucketed").buckets(*rand_qkv(1, 5, 5, 2, 2, 8)[:2])
