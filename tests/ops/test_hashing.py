"""Angular LSH bucketing (``lsh_buckets``) and keep-masks as buckets (docs/design.md,
section 1), against the definition computed here in float64 (argmax of the rotated
vector, mixed radix of the factors' argmaxes), its invariances (positive scaling, sign,
seed, shared rotations within a head group), the scheme table's factorisations (an
independent dynamic program) and the ValueErrors of bad arguments."""
import numpy as np
import pytest
import torch

import dist_sparse_attn as dsa
from dist_sparse_attn.hashing import (buckets_from_rotations, lsh_rotations, lsh_scheme,
                                      rotation_groups)
from dist_sparse_attn.kernels.torch_hash import merge_fine_buckets


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


# ----------------------------------------------------------------- schemes by n_buckets

def _min_split(n, memo={}):
    """(fewest factors in [2, 64] with product n, smallest sum among those), by dynamic
    programming over divisors: an independent check of lsh_scheme's factorisation."""
    if n not in memo:
        best = (1, n) if n <= 64 else (10 ** 9, 10 ** 9)
        for f in range(2, 65):
            if n % f == 0 and n // f > 1:
                k, s = _min_split(n // f)
                best = min(best, (k + 1, s + f))
        memo[n] = best
    return memo[n]


@pytest.mark.parametrize("n,factors,merge", [
    (2, (2,), 0), (64, (64,), 0), (66, (6, 11), 0), (128, (8, 16), 0), (150, (10, 15), 0),
    (2048, (32, 64), 0), (4096, (64, 64), 0), (8192, (16, 16, 32), 0),
    (65536, (32, 32, 64), 0), (2 ** 30, (64,) * 5, 0),
    (134, (32, 64), 2048), (2 * 3 * 67, (64, 64), 4096)], ids=str)
def test_scheme_table(n, factors, merge):
    s = lsh_scheme(n)
    assert (s.factors, s.merge, s.classic) == (factors, merge, n <= 64)


def test_scheme_factorisations_are_minimal():
    """Every even n_buckets in (64, 3000]: fewest factors in [2, 64], then the smallest
    sum, ascending; a prime factor above 64 merges from a power of two M >= 8 n."""
    for n in range(66, 3001, 2):
        s = lsh_scheme(n)
        prod = 1
        for f in s.factors:
            prod *= f
        assert list(s.factors) == sorted(s.factors) and all(2 <= f <= 64 for f in s.factors)
        if s.merge:
            assert prod == s.merge and s.merge & (s.merge - 1) == 0
            assert 8 * n <= s.merge < 16 * n
            assert max(p for p in range(2, n + 1) if n % p == 0
                       and all(p % d for d in range(2, p))) > 64
        else:
            assert prod == n and (len(s.factors), sum(s.factors)) == _min_split(n), n
        assert s.n_columns == sum(f // 2 if f % 2 == 0 else f for f in s.factors)


def test_merge_arithmetic_exact_at_extremes():
    """merge_fine_buckets == fine * n // M in exact integers, up to n near 2**30."""
    for n in (134, 2 * 3 * 67, 2 ** 30 - 2, 2 ** 29 + 2):
        m = lsh_scheme(n).merge
        fine = torch.cat([torch.randint(0, m, (2000,)), torch.tensor([0, m - 1, m // 2])])
        got = merge_fine_buckets(fine, n, m)
        assert got.tolist() == [f * n // m for f in fine.tolist()]
    # every bucket collects floor(M / n) or one more fine buckets
    n = 134
    m = lsh_scheme(n).merge
    counts = torch.bincount(merge_fine_buckets(torch.arange(m), n, m), minlength=n)
    assert counts.numel() == n and set(counts.tolist()) <= {m // n, m // n + 1}


@pytest.mark.parametrize("n", [2, 16, 64])
def test_classic_rotations_unchanged(n):
    """n_buckets <= 64 (the classic scheme): the rotation is the raw Gaussian draw."""
    R = lsh_rotations(6, 24, n, seed=17, group_size=3)
    assert torch.equal(R, torch.randn(2, 24, n // 2, generator=torch.Generator().manual_seed(17)))


@pytest.mark.parametrize("n,D", [(2048, 64), (6000, 24), (4096, 16), (134, 16), (150, 40)],
                         ids=str)
def test_product_rotations(n, D):
    """The factors' blocks, packed in order into groups of <= D columns: Gram-Schmidt of
    the seeded Gaussian draw per group (orthonormal columns, G = Q U with U upper
    triangular, positive diagonal); a block of more than D columns: the draw's columns
    scaled to unit norm."""
    s = lsh_scheme(n)
    R = lsh_rotations(4, D, n, seed=8, group_size=2)
    G = torch.randn(2, D, s.n_columns, generator=torch.Generator().manual_seed(8)).double()
    assert R.shape == (2, D, s.n_columns) and R.dtype == torch.float32
    groups = rotation_groups(s, D)
    assert sum(c for _, c in groups) == s.n_columns
    if s.n_columns <= D:                  # one group: every column orthogonal to every other
        assert groups == ((0, s.n_columns),)
    for c0, c in groups:
        Q, Gb = R[:, :, c0:c0 + c].double(), G[:, :, c0:c0 + c]
        norms = Q.norm(dim=1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)
        if c <= D:
            eye = torch.eye(c, dtype=torch.float64).expand(2, c, c)
            assert torch.allclose(Q.transpose(1, 2) @ Q, eye, atol=1e-6)
            U = Q.transpose(1, 2) @ Gb                                   # (2, c, c)
            assert torch.allclose(U.tril(-1), torch.zeros_like(U), atol=1e-5)
            assert (U.diagonal(dim1=1, dim2=2) > 0).all()
            assert torch.allclose(Q @ U, Gb, atol=1e-5)
        else:
            assert torch.allclose(Q, Gb / Gb.norm(dim=1, keepdim=True), atol=1e-6)
    assert torch.equal(R, lsh_rotations(4, D, n, seed=8, group_size=2))


def _definition(x, R, n, group_size):
    """Buckets by the definition, in float64 and Python integers, and a mask of the tokens
    whose argmax in every factor leads the runner-up by > 1e-4 * |x| (float32 rounding
    of the projections cannot flip those)."""
    s = lsh_scheme(n)
    Rh = R.double().repeat_interleave(group_size, 0)                      # (heads, D, C)
    xr = torch.einsum("bnhd,hdc->bnhc", x.double(), Rh)
    scale = x.double().norm(dim=-1)
    bucket = torch.zeros(x.shape[:3], dtype=torch.int64)
    clear = torch.ones(x.shape[:3], dtype=torch.bool)
    for f, c0, c, signed in s.blocks:
        p = xr[..., c0:c0 + c]
        p = torch.cat([p, -p], -1) if signed else p                        # (..., f)
        bucket = bucket * f + p.argmax(-1)
        if f > 1:
            top2 = p.topk(2, -1).values
            clear &= top2[..., 0] - top2[..., 1] > 1e-4 * scale
    if s.merge:
        bucket = torch.tensor([b * n // s.merge for b in bucket.flatten().tolist()],
                              dtype=torch.int64).view(bucket.shape)
    return bucket, clear


@pytest.mark.parametrize("n,group_size,D", [(128, 1, 16), (150, 2, 24), (6000, 1, 32),
                                            (134, 4, 16), (2048, 2, 64), (64, 2, 16)],
                         ids=str)
def test_product_matches_definition(n, group_size, D):
    """bucket = mixed radix of the factors' argmaxes (+ half before - half), merged
    where the scheme says so."""
    x = rand_x(B=2, N=301, heads=4, D=D)
    R = lsh_rotations(4, D, n, seed=3, group_size=group_size)
    want, clear = _definition(x, R, n, group_size)
    assert clear.float().mean() > 0.9
    got = dsa.lsh_buckets(x, n, seed=3, group_size=group_size)
    assert got.dtype == torch.int64 and int(got.min()) >= 0 and int(got.max()) < n
    assert torch.equal(got[clear], want[clear])


@pytest.mark.parametrize("n", [128, 150, 134, 6000])
def test_product_scheme_properties(n):
    """Deterministic per seed, invariant to positive scaling (powers of two: exact), the
    global RNG irrelevant, group heads share rotations."""
    x = rand_x(N=41)
    a = dsa.lsh_buckets(x, n, seed=11)
    torch.manual_seed(0)
    assert torch.equal(dsa.lsh_buckets(x, n, seed=11), a)
    assert not torch.equal(dsa.lsh_buckets(x, n, seed=12), a)
    for factor in (2.0, 2.0 ** -12, 64.0):
        assert torch.equal(dsa.lsh_buckets(x * factor, n, seed=11), a)
    k = rand_x(N=41, heads=2)
    q = k.repeat_interleave(2, dim=2)
    assert torch.equal(dsa.lsh_buckets(q, n, seed=4, group_size=2),
                       dsa.lsh_buckets(k, n, seed=4).repeat_interleave(2, dim=2))


def test_product_buckets_balanced_on_isotropic_inputs():
    """Gaussian inputs fill the buckets of the product scheme evenly: 256 = 16 * 16
    buckets, ~128 tokens each, D = 64. A fair multinomial stays near 1.2x max/mean; one
    unnormalised Gaussian rotation for all 256 buckets gives ~3.7x, and blocks
    orthonormal only within themselves (correlated factors) ~2.8x."""
    x = torch.randn(1, 32768, 1, 64)
    b = dsa.lsh_buckets(x, 256, seed=1)
    counts = torch.bincount(b.flatten(), minlength=256).double()
    assert counts.numel() == 256
    ratio = (counts.max() / counts.mean()).item()
    assert ratio < 1.5 and (counts.min() / counts.mean()).item() > 0.5, counts


def test_merged_scheme_fills_every_bucket():
    """134 = 2 * 67: 2048 fine buckets (32 * 64) merged 15 or 16 to a bucket."""
    x = torch.randn(1, 8192, 2, 64)
    b = dsa.lsh_buckets(x, 134, seed=2)
    counts = torch.bincount(b.flatten(), minlength=134).double()
    assert counts.numel() == 134 and (counts.max() / counts.mean()).item() < 1.6


def test_hashing_grows_linearly_at_fixed_bucket_size():
    """16x the tokens with 16x the buckets (128 tokens per bucket): hashing time grows
    at most 60x (linear: 16x; the product scheme's columns grow 4x, 12 -> 48, and
    measured 23-25x; one rotation for all buckets grew ~220x). CPU time of one thread
    (what other processes on the machine do hardly changes it), the best of 7 runs,
    the two sizes interleaved."""
    import time

    xs = {(2048, 128): torch.randn(1, 2048, 4, 64), (32768, 2048): torch.randn(1, 32768, 4, 64)}
    best = dict.fromkeys(xs, float("inf"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for (N, n), x in xs.items():
            dsa.lsh_buckets(x, n)                  # rotations drawn and cached
        for _ in range(7):
            for (N, n), x in xs.items():
                t0 = time.process_time()
                dsa.lsh_buckets(x, n)
                best[N, n] = min(best[N, n], time.process_time() - t0)
    finally:
        torch.set_num_threads(threads)
    small, large = best[2048, 128], best[32768, 2048]
    assert large / small <= 60, (small, large, large / small)


# ----------------------------------------------------------------- seed / n_buckets checks

@pytest.mark.parametrize("seed", ["abc", 1.5, 2.0, True, None, -1, 2 ** 63, np.float64(3)],
                         ids=["str", "float", "float-int", "bool", "none", "negative", "2**63",
                              "np-float"])
def test_bad_seed(seed):
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*63\)"):
        dsa.lsh_buckets(rand_x(), 8, seed=seed)
    with pytest.raises(ValueError, match="seed"):
        dsa.lsh_buckets(rand_x(), 256, seed=seed)
    with pytest.raises(ValueError, match="seed"):
        lsh_rotations(4, 16, 8, seed=seed)
    q = rand_x(N=9)
    with pytest.raises(ValueError, match="seed"):
        dsa.hash_sparse_attention(q, q, q, 8, seed=seed, backend="torch")


def test_numpy_integer_seed_and_n_buckets():
    x = rand_x()
    assert torch.equal(dsa.lsh_buckets(x, np.int64(256), seed=np.int32(5)),
                       dsa.lsh_buckets(x, 256, seed=5))
    assert torch.equal(dsa.lsh_buckets(x, 8, seed=2 ** 63 - 1),
                       dsa.lsh_buckets(x, 8, seed=2 ** 63 - 1))


@pytest.mark.parametrize("n", [2 ** 40, 2 ** 30 + 2, 2 ** 31])
def test_n_buckets_too_large(n):
    """Rejected at once (no allocation attempt), naming n_buckets and its range."""
    with pytest.raises(ValueError, match=r"n_buckets must be an even integer in \[2, 2\*\*30\]"):
        dsa.lsh_buckets(rand_x(), n)
    q = rand_x(N=9)
    with pytest.raises(ValueError, match="n_buckets"):
        dsa.hash_sparse_attention(q, q, q, n, backend="torch")


def test_largest_n_buckets():
    b = dsa.lsh_buckets(rand_x(N=5), 2 ** 30, seed=1)
    assert int(b.min()) >= 0 and int(b.max()) < 2 ** 30


def test_buckets_from_rotations_checks():
    x = rand_x(heads=4, D=16)
    R = lsh_rotations(4, 16, 150, seed=1, group_size=2)
    assert torch.equal(buckets_from_rotations(x, R, 150, 2),
                       dsa.lsh_buckets(x, 150, seed=1, group_size=2))
    for bad in (R[:, :, :-1], R.double(), R[:1], "R"):
        with pytest.raises(ValueError, match="rotations must be a float32 tensor"):
            buckets_from_rotations(x, bad, 150, 2)
    with pytest.raises(ValueError, match=r"rotations\.device"):
        buckets_from_rotations(x, R.to("meta"), 150, 2)
