"""Angular LSH bucketing (``lsh_buckets``) and keep-masks as buckets (DESIGN §1)."""
import pytest
import torch

import dist_sparse_attn as dsa
from dist_sparse_attn.hashing import lsh_rotations


def rand_x(B=2, N=57, heads=4, D=16, dtype=torch.float32):
    return torch.randn(B, N, heads, D).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64],
                         ids=["fp16", "bf16", "fp32", "fp64"])
@pytest.mark.parametrize("n", [2, 8, 64])
def test_shape_dtype_range(n, dtype):
    x = rand_x(dtype=dtype)
    b = dsa.lsh_buckets(x, n)
    assert b.shape == x.shape[:3] and b.dtype == torch.int64
    assert int(b.min()) >= 0 and int(b.max()) < n
    if n <= 8:    # 2 * 57 * 4 tokens cover every bucket of a small hash
        assert torch.unique(b).numel() == n


@pytest.mark.parametrize("group_size", [1, 2, 4])
def test_matches_definition(group_size):
    """bucket = argmax([xR ; -xR]) with head h using rotation h // group_size."""
    n, x = 8, rand_x()
    heads, D = x.shape[2], x.shape[3]
    R = lsh_rotations(heads, D, n, seed=3, group_size=group_size)
    assert R.shape == (heads // group_size, D, n // 2) and R.dtype == torch.float32
    expect = torch.empty(x.shape[:3], dtype=torch.int64)
    clear = torch.empty(x.shape[:3], dtype=torch.bool)      # no near-tie: rounding can't flip it
    for h in range(heads):
        xr = x[:, :, h].double() @ R[h // group_size].double()     # (B, N, n/2)
        proj = torch.cat([xr, -xr], -1)                              # (B, N, n)
        expect[:, :, h] = proj.argmax(-1)
        top2 = proj.topk(2, -1).values
        clear[:, :, h] = top2[..., 0] - top2[..., 1] > 1e-4
    assert clear.float().mean() > 0.95
    got = dsa.lsh_buckets(x, n, seed=3, group_size=group_size)
    assert torch.equal(got[clear], expect[clear])


def test_rotations_drawn_from_seeded_cpu_generator():
    R = lsh_rotations(4, 16, 8, seed=5, group_size=2)
    expect = torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(R, expect)


def test_deterministic_per_seed():
    x = rand_x()
    a = dsa.lsh_buckets(x, 16, seed=11)
    torch.manual_seed(0)                      # the global RNG state must not matter
    assert torch.equal(dsa.lsh_buckets(x, 16, seed=11), a)
    assert not torch.equal(dsa.lsh_buckets(x, 16, seed=12), a)
    assert torch.equal(dsa.lsh_buckets(x, 16), dsa.lsh_buckets(x, 16, seed=0))


@pytest.mark.parametrize("factor", [2.0, 0.5, 8.0, 2.0 ** -10])
def test_invariant_to_positive_scaling(factor):
    """Powers of two scale exactly, so the buckets are bitwise identical."""
    x = rand_x()
    assert torch.equal(dsa.lsh_buckets(x * factor, 16, seed=1), dsa.lsh_buckets(x, 16, seed=1))


@pytest.mark.parametrize("n", [2, 4, 16])
def test_antipodal(n):
    """argmax([-xR ; xR]) is the argmax of [xR ; -xR] shifted by n/2."""
    x = rand_x()
    b = dsa.lsh_buckets(x, n, seed=2)
    assert torch.equal(dsa.lsh_buckets(-x, n, seed=2), (b + n // 2) % n)


def test_group_shares_rotation():
    """With group_size g, heads h and h' with h // g == h' // g use one rotation, and
    head h's buckets are those of a g=1 hash of the heads {h0, h0 + g, ...} at rank h // g."""
    g, n = 2, 8
    x = rand_x(heads=4)
    b = dsa.lsh_buckets(x, n, seed=9, group_size=g)
    # identical vectors in heads of one group hash identically ...
    same = x.clone()
    same[:, :, 1] = same[:, :, 0]
    bs = dsa.lsh_buckets(same, n, seed=9, group_size=g)
    assert torch.equal(bs[..., 0], bs[..., 1])
    # ... and across groups they do not (different rotations)
    same[:, :, 2] = same[:, :, 0]
    assert not torch.equal(dsa.lsh_buckets(same, n, seed=9, group_size=g)[..., 2], bs[..., 0])
    # rotation r = h // g is the r-th of heads // g rotations
    for offset in range(g):
        sub = x[:, :, offset::g]                                     # heads offset, offset + g
        assert torch.equal(dsa.lsh_buckets(sub, n, seed=9), b[..., offset::g])


def test_query_heads_hash_with_their_kv_head():
    """GQA: q head h hashed with group_size H // Hkv uses k head h // (H // Hkv)'s rotation."""
    H, Hkv, n = 4, 2, 8
    k = rand_x(heads=Hkv)
    q = k.repeat_interleave(H // Hkv, dim=2)                          # q head h = k head h // 2
    qb = dsa.lsh_buckets(q, n, seed=4, group_size=H // Hkv)
    kb = dsa.lsh_buckets(k, n, seed=4)
    assert torch.equal(qb, kb.repeat_interleave(H // Hkv, dim=2))


def test_half_inputs_hash_like_float32():
    x = rand_x(dtype=torch.float16)
    assert torch.equal(dsa.lsh_buckets(x, 8), dsa.lsh_buckets(x.float(), 8))


def test_keep_to_buckets():
    keep = torch.rand(2, 9, 3) < 0.5
    b = dsa.keep_to_buckets(keep)
    assert b.dtype == torch.int64
    assert torch.equal(b[keep], torch.zeros_like(b[keep]))
    assert (b[~keep] < 0).all()


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("n", [3, 7, 1, 0, -2, 4.0, "8", True, None],
                         ids=["odd3", "odd7", "one", "zero", "negative", "float", "str", "bool",
                              "none"])
def test_bad_n_buckets(n):
    with pytest.raises(ValueError, match="n_buckets"):
        dsa.lsh_buckets(rand_x(), n)


@pytest.mark.parametrize("group_size", [3, 0, -1, 8, 2.0], ids=["3", "0", "-1", "8", "float"])
def test_bad_group_size(group_size):
    with pytest.raises(ValueError, match="group_size"):
        dsa.lsh_buckets(rand_x(heads=4), 8, group_size=group_size)


@pytest.mark.parametrize("x", [torch.randn(2, 5, 16), torch.randn(1, 2, 5, 3, 16), torch.randn(16)],
                         ids=["3d", "5d", "1d"])
def test_bad_rank(x):
    with pytest.raises(ValueError, match="x must be a 4-D"):
        dsa.lsh_buckets(x, 8)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool],
                         ids=["int64", "int32", "bool"])
def test_integer_input(dtype):
    with pytest.raises(ValueError, match="x must be floating"):
        dsa.lsh_buckets(torch.ones(1, 3, 2, 4, dtype=dtype), 8)


def test_non_tensor_input():
    with pytest.raises(ValueError, match="x must be a 4-D"):
        dsa.lsh_buckets([[[[1.0]]]], 8)


def test_rotation_cache_survives_inference_mode():
    """Hashing once under torch.inference_mode (e.g. an eval loop) must not break later
    hashing of tensors that require grad (e.g. the next training step)."""
    x = rand_x()
    seed = 424242                       # a seed no other test uses: first call fills any cache
    with torch.inference_mode():
        b_inf = dsa.lsh_buckets(x, 8, seed=seed)
    b = dsa.lsh_buckets(x.clone().requires_grad_(True), 8, seed=seed)
    assert torch.equal(b, b_inf)
