"""The fused LSH hashing kernel (``kernels/triton_hash.py``) against the PyTorch path of
``lsh_buckets`` (itself checked against the definition in ``tests/ops/test_hashing.py``).

Tests taking ``triton_device`` run the kernel on the CPU under TRITON_INTERPRET=1 (set by
conftest.py; small sizes) and on a CUDA GPU, against the PyTorch path on the CPU: buckets
equal wherever float32 rounding cannot flip the argmax, exactly with integer inputs, and
the sort keys of those buckets. The GPU-only test (marked ``gpu``) hashes bfloat16 rows
(the tensor-core path) at N = 4096 and checks the ``hash_sparse_attention`` contract. The
sm_90 compile check needs no GPU, only the ``cuobjdump`` shipped with Triton.
"""
import pytest
import torch

import dist_sparse_attn as dsa
from helpers import run_sm90_check


def _hash_input(B, N, heads, D, dtype, layout, device):
    """x (B, N, heads, D) on ``device``: contiguous, or a strided view (heads-major storage,
    every other element of the head dim)."""
    if layout == "strided":
        return torch.randn(B, heads, N, 2 * D).to(dtype).to(device).transpose(1, 2)[..., ::2]
    return torch.randn(B, N, heads, D).to(dtype).to(device)


def _clear_tokens(x, n_buckets, seed, group):
    """Tokens whose argmax in every factor leads the runner-up by > 1e-4 |x| in float64:
    float32 sums in any order give the same bucket there."""
    from dist_sparse_attn.hashing import lsh_rotations, lsh_scheme
    R = lsh_rotations(x.shape[2], x.shape[3], n_buckets, seed=seed, group_size=group)
    xr = torch.einsum("bnhd,hdc->bnhc", x.double(), R.double().repeat_interleave(group, 0))
    clear = torch.ones(x.shape[:3], dtype=torch.bool)
    for f, c0, c, signed in lsh_scheme(n_buckets).blocks:
        p = xr[..., c0:c0 + c]
        top2 = (torch.cat([p, -p], -1) if signed else p).topk(2, -1).values
        clear &= top2[..., 0] - top2[..., 1] > 1e-4 * x.double().norm(dim=-1)
    return clear


# (n_buckets, D, group, dtype, N, layout): classic and product schemes (2 and 3 factors,
# odd factors (74 = 2 * 37: 37 columns, two column tiles), merged, 5 and 6 factors),
# head dims in one and several tiles
FUSED_CASES = [
    (2, 16, 1, torch.float32, 77, "contiguous"),
    (8, 64, 2, torch.float16, 65, "strided"),
    (64, 24, 1, torch.float32, 129, "contiguous"),
    (40, 32, 4, torch.float16, 33, "contiguous"),
    (64, 128, 1, torch.float32, 71, "strided"),
    (128, 80, 2, torch.float32, 97, "contiguous"),
    (150, 16, 1, torch.float16, 63, "contiguous"),
    (74, 24, 2, torch.float32, 53, "contiguous"),
    (2048, 64, 2, torch.float32, 101, "strided"),
    (6000, 128, 1, torch.float16, 45, "contiguous"),
    (134, 64, 4, torch.float32, 67, "contiguous"),
    (4096, 256, 1, torch.float32, 31, "strided"),
    (2 ** 30, 16, 1, torch.float32, 37, "contiguous"),
    (2 ** 30 - 2, 16, 2, torch.float16, 29, "contiguous"),
]


@pytest.mark.parametrize("n_buckets,D,group,dtype,N,layout", FUSED_CASES,
                         ids=[f"nb{c[0]}-D{c[1]}-g{c[2]}-{str(c[3])[6:]}-N{c[4]}-{c[5]}"
                              for c in FUSED_CASES])
def test_fused_lsh_kernel_matches_torch(triton_device, n_buckets, D, group, dtype, N, layout):
    """The fused hashing kernel gives the buckets of the PyTorch path (on the CPU), and the
    sort keys of those buckets."""
    from dist_sparse_attn.hashing import lsh_rotations, lsh_scheme
    from dist_sparse_attn.kernels.triton_hash import lsh_triton
    from dist_sparse_attn.layout import bucket_keys
    B, heads = 2, 4
    x = _hash_input(B, N, heads, D, dtype, layout, triton_device)
    want = dsa.lsh_buckets(x.cpu(), n_buckets, seed=3, group_size=group)
    rot = lsh_rotations(heads, D, n_buckets, seed=3, group_size=group, device=triton_device)
    got = lsh_triton(x, rot, lsh_scheme(n_buckets), group, write_keys=False)
    clear = _clear_tokens(x.cpu(), n_buckets, 3, group)
    assert clear.float().mean() > 0.9
    got_cpu = got.cpu()
    assert torch.equal(got_cpu[clear], want[clear])
    # float32 sums in another order may flip an exact near-tie
    assert (got_cpu == want).float().mean() >= 0.98
    keys = lsh_triton(x, rot, lsh_scheme(n_buckets), group, write_keys=True)
    assert torch.equal(keys, bucket_keys(got, torch.arange(N, device=triton_device).expand(B, N)))


@pytest.mark.parametrize("n_buckets,D", [(8, 16), (64, 80), (150, 16), (74, 24), (2048, 64),
                                         (134, 32)], ids=str)
def test_fused_lsh_kernel_exact_ties(triton_device, n_buckets, D):
    """Integer inputs and rotations: every projection is exact in float32, in any order,
    and full of ties (and zero rows: all ties). The kernel must break them like the
    PyTorch path: first maximal index, the + half before the - half."""
    from dist_sparse_attn.hashing import buckets_from_rotations, lsh_scheme
    from dist_sparse_attn.kernels.triton_hash import lsh_triton
    B, N, heads, group = 1, 70, 4, 2
    x = torch.randint(-2, 3, (B, N, heads, D)).float()
    x[:, :5] = 0.0
    rot = torch.randint(-1, 2, (heads // group, D, lsh_scheme(n_buckets).n_columns)).float()
    want = buckets_from_rotations(x, rot, n_buckets, group)
    got = lsh_triton(x.to(triton_device), rot.to(triton_device), lsh_scheme(n_buckets), group,
                     write_keys=False).cpu()
    assert torch.equal(got, want)
    assert (want[:, :5] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("nb,D", [(16, 64), (64, 128), (2048, 64), (134, 128), (6000, 256),
                                  (8192, 32)], ids=str)
def test_fused_hashing_matches_cpu_and_contract(nb, D):
    """GPU hashing (fused kernel, classic and product schemes) agrees with the CPU
    path, and hash_sparse_attention equals bucketed_attention on lsh_buckets exactly."""
    B, N, H, Hkv = 2, 4096, 8, 2
    q = torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, N, Hkv, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    qb = dsa.lsh_buckets(q, nb, seed=5, group_size=H // Hkv)
    cpu = dsa.lsh_buckets(q.cpu(), nb, seed=5, group_size=H // Hkv)
    assert (qb.cpu() == cpu).float().mean() >= 0.999
    kb = dsa.lsh_buckets(k, nb, seed=5)
    a = dsa.hash_sparse_attention(q, k, v, nb, seed=5)
    b = dsa.bucketed_attention(q, k, v, qb, kb)
    assert torch.equal(a, b)


_SM90_CHECK = r"""
from dist_sparse_attn.hashing import lsh_scheme
from dist_sparse_attn.kernels import triton_hash as th
cases = [(nb, D, False) for nb, D in [(64, 128), (2048, 64), (6000, 256), (65536, 64),
                                        (2 ** 30 - 2, 16)]]
cases += [(nb, D, True) for nb, D in [(16, 64), (2048, 64), (8192, 64), (2048, 128),
                                       (6000, 128), (2 ** 30 - 2, 16)]]
for nb, D, split in cases:
    s = lsh_scheme(nb)
    block_d = max(16, triton.next_power_of_2(D)) if split else \
        min(th._MAX_BLOCK_D, triton.next_power_of_2(D))
    cons = dict(D=D, C=s.n_columns, BLOCK_D=block_d,
                BLOCK_N=th._BLOCK_N_SPLIT if split else th._BLOCK_N,
                MERGE_BITS=max(0, s.merge.bit_length() - 1),
                WRITE_KEY=True, SPLIT=split, **th._factor_args(s))
    names = th._lsh_kernel.arg_names
    types = dict(X="*bf16", R="*bf16" if split else "*fp32", OUT="*i64")
    sig = {n: "constexpr" if n in cons else types.get(n, "i32") for n in names}
    stack, line = compile_sm90(th._lsh_kernel, sig, cons,
                               num_warps=4 if len(s.factors) <= 2 else 8)
    print(nb, D, split, line)
    assert stack == 0, (nb, D, split, line)
"""


@pytest.mark.timeout(300)
def test_fused_lsh_kernel_compiles_for_sm90_without_spills(tmp_path):
    """The fused hashing kernel compiles for an H100/H200 (sm_90, no GPU needed) and
    ptxas spills no registers, for the classic scheme at D = 128 (where a whole-D
    dot spilled and ran ~20x slower than PyTorch), 2 and 3 factors up to D = 256,
    and the 6-factor merged scheme; and the tensor-core path for bfloat16 rows (split
    rotations) up to D = 128."""
    run_sm90_check(_SM90_CHECK, tmp_path)
