"""The Triton counting sort of stream keys (kernels/triton_sort.py) against
torch.sort(stable=True): exact equality of (key, index).

Tests taking ``triton_device`` run on the CPU under TRITON_INTERPRET=1 (set by
conftest.py; small sizes only) and on a CUDA GPU. In the interpreter the chunk sort is
a rank sort (tl.sort's bitonic network is far too slow there); two interpreter-only
tests force the GPU branch (tl.sort) with small chunks and check the dispatch the
interpreter takes. The GPU-only tests at the bottom (marked ``gpu``) check realistic
sizes and hash_sparse_attention end to end.
"""
import pytest
import torch

from dist_sparse_attn.kernels import Backend
from dist_sparse_attn.layout import DROP, bucket_keys
from helpers import triton_runs_on

interp_only = pytest.mark.skipif(
    not triton_runs_on("cpu"),
    reason="interpreter tests run on machines without CUDA (TRITON_INTERPRET=1)")


def _keys(S, N, nb, p_drop=0.2, device="cpu", positions=None):
    """(S, N) stream keys: random buckets in [0, nb), a fraction DROP, positions arange(N)."""
    b = torch.randint(0, nb, (S, N), device=device)
    b = torch.where(torch.rand(S, N, device=device) < p_drop, DROP, b)
    pos = torch.arange(N, device=device) if positions is None else positions
    return (b << 32) | (pos + 2 ** 31)


def _check(key, nb, **kw):
    from dist_sparse_attn.kernels.triton_sort import bucket_sort_streams
    got_key, got_idx = bucket_sort_streams(key, nb, **kw)
    want = torch.sort(key, dim=-1, stable=True)
    assert torch.equal(got_key, want.values)
    assert torch.equal(got_idx, want.indices)


# (S, N, n_buckets, chunk): N below, at and above the chunk, not a multiple of it
CASES = [
    (1, 1, 2, None), (3, 1, 100, None), (2, 7, 1, None), (2, 37, 16, None),
    (3, 256, 16, None), (2, 300, 2, None), (3, 1000, 16, None), (2, 700, 100, None),
    (4, 200, 16, 16), (2, 333, 100, 32), (5, 129, 1, 64),
]


@pytest.mark.parametrize("S,N,nb,chunk", CASES, ids=str)
def test_counting_sort_equals_torch_sort(triton_device, S, N, nb, chunk):
    _check(_keys(S, N, nb, device=triton_device), nb, chunk=chunk)


@pytest.mark.parametrize("trial", range(8))
def test_counting_sort_random_shapes(triton_device, trial):
    S, N = int(torch.randint(1, 5, ())), int(torch.randint(1, 700, ()))
    nb = [1, 2, 16, 100][trial % 4]
    chunk = [None, 16, 32, 128][trial // 2 % 4]
    _check(_keys(S, N, nb, p_drop=float(torch.rand(())), device=triton_device), nb,
           chunk=chunk)


def test_counting_sort_outside_precondition_is_a_permutation(triton_device):
    """Descending positions and out-of-range buckets break the precondition: the
    result is then no longer torch.sort's, but still a permutation, ordered by bin."""
    from dist_sparse_attn.kernels.triton_sort import bucket_sort_streams
    dev = triton_device
    S, N, nb = 2, 300, 8
    b = torch.randint(0, nb + 3, (S, N), device=dev)           # some >= nb: counted as DROP
    key = (b << 32) | (torch.arange(N, device=dev).flip(0) + 2 ** 31)
    k, i = bucket_sort_streams(key, nb, chunk=64)
    assert torch.equal(i.sort(-1).values, torch.arange(N, device=dev).expand(S, N))
    assert torch.equal(k, key.gather(1, i))
    binned = torch.where(b < nb, b, nb).gather(1, i)
    assert (binned[:, 1:] >= binned[:, :-1]).all()


@pytest.mark.parametrize("S,N,nb,chunk", [(2, 500, 16, 16), (3, 100, 100, None),
                                          (2, 41, 1, 16)], ids=str)
def test_counting_sort_cumsum_path(triton_device, S, N, nb, chunk, monkeypatch):
    """The offsets from torch.cumsum over all streams (large histograms) instead
    of the in-kernel prefix."""
    from dist_sparse_attn.kernels import triton_sort
    monkeypatch.setattr(triton_sort, "_FUSE_TILE", 0)
    _check(_keys(S, N, nb, device=triton_device), nb, chunk=chunk)


@interp_only
def test_counting_sort_with_tl_sort(monkeypatch):
    """The GPU branch (tl.sort for the chunk sort) run by the interpreter, small chunks."""
    from dist_sparse_attn.kernels import triton_sort
    monkeypatch.setattr(triton_sort, "interpreting", lambda: False)
    _check(_keys(2, 100, 16), 16, chunk=16)
    _check(_keys(1, 70, 2), 2, chunk=32)


@pytest.mark.parametrize("p_drop", [0.0, 1.0], ids=["no-drop", "all-drop"])
def test_counting_sort_extremes(triton_device, p_drop):
    dev = triton_device
    _check(_keys(3, 300, 16, p_drop=p_drop, device=dev), 16)
    one_bucket = torch.zeros(2, 100, dtype=torch.int64, device=dev) \
        | (torch.arange(100, device=dev) + 2 ** 31)
    _check(one_bucket, 4)


def test_counting_sort_ties_and_gaps(triton_device):
    """Non-decreasing positions with repeats and gaps (the precondition allows both)."""
    pos = torch.cat([torch.zeros(20, dtype=torch.int64), torch.arange(50) * 3,
                     torch.full((30,), 1000)]).to(triton_device)
    _check(_keys(2, 100, 8, positions=pos, device=triton_device), 8, chunk=32)


@interp_only
def test_sort_keys_dispatch():
    """The fused backend's sort_keys with n_buckets takes the counting sort
    (interpreter) and gives torch.sort's result; without n_buckets it is torch.sort."""
    from dist_sparse_attn.kernels import triton_sort
    buckets = torch.randint(-1, 16, (2, 300, 3))
    key = bucket_keys(buckets, torch.arange(300).expand(2, 300))
    want = torch.sort(key, dim=-1, stable=True)
    calls = []
    real = triton_sort.bucket_sort_streams

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)
    triton_sort.bucket_sort_streams = spy
    try:
        for nb in (None, 16):
            got = Backend("triton", fused=True).sort_keys(key, nb)
            assert torch.equal(got.key, want.values) and torch.equal(got.index, want.indices)
    finally:
        triton_sort.bucket_sort_streams = real
    assert calls == [1]


def test_hash_sparse_path_with_counting_sort(triton_device):
    """ops.hash_sparse_attention's chain on the fused backend (lsh_sort_keys ->
    Backend.sort_keys(key, n_buckets) -> plan_from_streams -> Triton kernels), replayed
    step by step, equals hash_sparse_attention with the PyTorch backend."""
    import dist_sparse_attn as dsa
    from dist_sparse_attn.hashing import lsh_sort_keys
    from dist_sparse_attn.ops import BucketedAttentionFunction
    from dist_sparse_attn.plan import plan_from_streams
    B, N, H, Hkv, D, nb = 2, 90, 4, 2, 16, 4
    q, k, v = (torch.randn(B, N, h, D, device=triton_device) for h in (H, Hkv, Hkv))
    be = Backend("triton", fused=True)
    qs = be.sort_keys(lsh_sort_keys(q, nb, seed=7, group_size=H // Hkv), nb)
    ks = be.sort_keys(lsh_sort_keys(k, nb, seed=7), nb)
    plan = plan_from_streams(q, k, qs, ks, causal=True, include_self=True, softmax_scale=None)
    o, _ = BucketedAttentionFunction.apply(q, k, v, plan, be)
    want = dsa.hash_sparse_attention(q, k, v, nb, seed=7, backend="torch")
    torch.testing.assert_close(o, want, rtol=1e-5, atol=1e-6)


def test_qk_sparse_sorts_by_counting_and_matches_torch_backend(fused):
    """qk_sparse_attention on the fused backend takes the counting sort (kept tokens are
    bucket 0, dropped ones DROP) and equals the float64 oracle, output and gradients."""
    import dist_sparse_attn as dsa
    from dist_sparse_attn.hashing import keep_to_buckets
    from dist_sparse_attn.reference import reference_attention
    dev, ran = fused
    B, N, H, Hkv, D = 2, 90, 4, 2, 16
    q, k, v = (torch.randn(B, N, h, D, device=dev, requires_grad=True) for h in (H, Hkv, Hkv))
    q_keep = torch.rand(B, N, H, device=dev) < 0.4
    k_keep = torch.rand(B, N, Hkv, device=dev) < 0.4
    o = dsa.qk_sparse_attention(q, k, v, q_keep, k_keep)
    assert "sort" in ran, ran
    got = (o, *torch.autograd.grad(o.square().sum(), (q, k, v)))
    x64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = reference_attention(*x64, keep_to_buckets(q_keep), keep_to_buckets(k_keep))
    want = (ref, *torch.autograd.grad(ref.square().sum(), x64))
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5, msg=name)


def test_counting_sort_applies_limits():
    from dist_sparse_attn.kernels.triton_sort import _chunk_size, counting_sort_applies
    assert counting_sort_applies(24, 16384, 16)
    assert counting_sort_applies(12, 2 ** 20, 2048) and _chunk_size(2 ** 20, 2049) == 2048
    assert counting_sort_applies(12, 2 ** 21, 4096)
    assert not counting_sort_applies(1, 1000, 4096)         # histogram >> keys: torch.sort
    assert not counting_sort_applies(70000, 16, 2)           # grid dimension
    assert not counting_sort_applies(1, 0, 2) and not counting_sort_applies(1, 16, 0)
    for n in (1, 15, 255, 256, 1000, 2 ** 20):
        for nb in (1, 16, 100, 2048, 4096):
            c = _chunk_size(n, nb + 1)
            assert c & (c - 1) == 0 and 16 <= c <= 2048


def test_counting_sort_rejects_bad_input(triton_device):
    from dist_sparse_attn.kernels.triton_sort import bucket_sort_streams

    def zeros(*shape, dtype=torch.int64):
        return torch.zeros(*shape, dtype=dtype, device=triton_device)
    with pytest.raises(ValueError):
        bucket_sort_streams(zeros(4), 2)
    with pytest.raises(ValueError):
        bucket_sort_streams(zeros(2, 4, dtype=torch.int32), 2)
    with pytest.raises(ValueError):
        bucket_sort_streams(zeros(2, 4), 0)
    with pytest.raises(ValueError):
        bucket_sort_streams(zeros(2, 4), 2, chunk=48)
    k, i = bucket_sort_streams(zeros(0, 5), 2)
    assert k.shape == (0, 5) and i.shape == (0, 5)


# ---------------------------------------------------------------------------------------------
# GPU only: realistic sizes
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("S,N,nb", [(24, 16384, 16), (12, 2 ** 20, 2048), (24, 16384, 4096),
                                    (48, 65536, 64), (3, 1000, 16), (5, 1, 2), (4, 300, 1)],
                         ids=str)
@pytest.mark.parametrize("p_drop", [0.0, 0.3], ids=["lsh", "drops"])
def test_counting_sort_large_sizes(S, N, nb, p_drop):
    _check(_keys(S, N, nb, p_drop=p_drop, device="cuda"), nb)


@pytest.mark.gpu
@pytest.mark.parametrize("chunk", [16, 256, 2048])
def test_counting_sort_chunks_and_cumsum_large(chunk, monkeypatch):
    from dist_sparse_attn.kernels import triton_sort
    key = _keys(6, 5000, 16, device="cuda")
    _check(key, 16, chunk=chunk)
    monkeypatch.setattr(triton_sort, "_FUSE_TILE", 0)
    _check(key, 16, chunk=chunk)


@pytest.mark.gpu
@pytest.mark.parametrize("nb,D,N", [(16, 64, 4096), (64, 32, 3000)], ids=str)
def test_hash_sparse_on_cuda_equals_torch_sort_streams(nb, D, N):
    """hash_sparse_attention on CUDA: the counting sort gives the same streams as
    torch.sort, so output and gradients are bitwise equal to those of
    bucketed_attention on the same LSH buckets (sorted by torch.sort: no promise)."""
    import dist_sparse_attn as dsa
    from dist_sparse_attn import kernels
    from dist_sparse_attn.hashing import lsh_sort_keys
    B, H, Hkv = 2, 4, 2
    q = torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, N, Hkv, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, N, Hkv, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    key = lsh_sort_keys(q, nb, seed=5, group_size=H // Hkv)
    be = kernels.select("auto", q.device, q.dtype)
    assert be.fused
    a, b = be.sort_keys(key, nb), torch.sort(key, dim=-1, stable=True)
    assert torch.equal(a.key, b.values) and torch.equal(a.index, b.indices)

    def run(fn):
        o = fn()
        g = torch.autograd.grad(o.float().square().sum(), (q, k, v))
        return o, g
    o1, g1 = run(lambda: dsa.hash_sparse_attention(q, k, v, nb, seed=5))
    with torch.no_grad():
        qb = dsa.lsh_buckets(q, nb, seed=5, group_size=H // Hkv)
        kb = dsa.lsh_buckets(k, nb, seed=5)
    o2, g2 = run(lambda: dsa.bucketed_attention(q, k, v, qb, kb))           # torch.sort
    assert torch.equal(o1, o2)
    for x, y in zip(g1, g2):
        assert torch.equal(x, y)
