"""cap_buckets: the bucket cap against a direct (quadratic) construction, the bound it
promises, the attention it gives, and the sharded version on 3 gloo ranks."""
from __future__ import annotations

import datetime

import pytest
import torch

import dist_sparse_attn as dsa
from dist_sparse_attn.balance import bucket_sizes, cap_buckets
from helpers import assert_close_rel, assert_ranks_ok, record_cases, run_workers


def _direct(qb, kb, cap):
    """The module docstring's definition, token by token."""
    B, Nq, H = qb.shape
    Nk, Hkv = kb.shape[1], kb.shape[2]
    g = H // Hkv
    pieces = max(1, -(-Nk // cap))
    nq, nk = torch.full_like(qb, -1), torch.full_like(kb, -1)
    for b in range(B):
        for j in range(Hkv):
            col = kb[b, :, j].tolist()
            for t, beta in enumerate(col):
                if beta >= 0:
                    nk[b, t, j] = beta * pieces + col[:t].count(beta) // cap
            for h in range(j * g, (j + 1) * g):
                for i in range(Nq):
                    beta = int(qb[b, i, h])
                    if beta >= 0:
                        c = col[:min(i, Nk - 1) + 1].count(beta)
                        nq[b, i, h] = beta * pieces + max(c - 1, 0) // cap
    return nq, nk


@pytest.mark.parametrize("B,Nq,Nk,H,Hkv,nb,cap", [
    (1, 33, 33, 1, 1, 2, 5), (2, 40, 40, 4, 2, 3, 4), (1, 17, 29, 3, 1, 4, 1),
    (2, 29, 17, 2, 2, 5, 3), (1, 50, 50, 2, 1, 1, 64)],
    ids=["mha", "gqa", "nq_lt_nk", "nq_gt_nk", "no_split"])
def test_cap_matches_definition(B, Nq, Nk, H, Hkv, nb, cap):
    qb = torch.randint(-1, nb, (B, Nq, H))
    kb = torch.randint(-1, nb, (B, Nk, Hkv))
    got = cap_buckets(qb, kb, cap)
    want = _direct(qb, kb, cap)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # a promised bound on the ids (no host read of the largest one) changes nothing
    for bound in (nb, nb + 7):
        got = cap_buckets(qb, kb, cap, n_bins=bound)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), bound


def test_cap_bounds_every_bucket_and_keeps_small_ones():
    """A skewed hash (90 % of the keys in bucket 0): after the cap no bucket holds more
    than cap keys; buckets at or under the cap keep their keys together."""
    N, cap = 400, 25
    kb = torch.where(torch.rand(1, N, 2) < 0.9, 0, torch.randint(1, 8, (1, N, 2)))
    qb = kb.clone()
    new_q, new_k = cap_buckets(qb, kb, cap)
    assert int(bucket_sizes(new_k).max()) <= cap
    assert int(bucket_sizes(kb).max()) > 10 * cap
    for j in range(2):
        for beta in range(1, 8):
            ids = new_k[0, kb[0, :, j] == beta, j].unique()
            assert ids.numel() <= 1 or int((kb[0, :, j] == beta).sum()) > cap


def test_capped_attention_is_bucketed_attention_with_the_new_ids():
    """Every query attends the earlier keys of its bucket's piece: compare with the float64
    oracle on a mask built from the definition (a piece boundary cuts the history)."""
    B, N, H, Hkv, D, cap = 1, 48, 2, 1, 8, 6
    q, k, v = (torch.randn(B, N, h, D, dtype=torch.float64) for h in (H, Hkv, Hkv))
    qb = torch.randint(0, 2, (B, N, H))
    kb = torch.randint(0, 2, (B, N, Hkv))
    nq, nk = cap_buckets(qb, kb, cap)
    o = dsa.bucketed_attention(q, k, v, nq, nk, backend="torch")
    # direct: query i sees key t iff same bucket, t <= i, and t is among the keys of
    # the piece holding the most recent key of i's bucket
    o_ref = torch.zeros_like(o)
    g = H // Hkv
    for h in range(H):
        col = kb[0, :, h // g].tolist()
        for i in range(N):
            beta = int(qb[0, i, h])
            keys = [t for t in range(i + 1) if col[t] == beta]
            if not keys:
                continue
            piece = (len(keys) - 1) // cap
            keys = keys[piece * cap:]
            s = q[0, i, h] @ k[0, keys, h // g].T / D ** 0.5
            o_ref[0, i, h] = torch.softmax(s, 0) @ v[0, keys, h // g]
    assert_close_rel(o, o_ref, rtol=1e-12, name="o")


def test_cap_errors():
    qb = torch.zeros(1, 4, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="max_size"):
        cap_buckets(qb, qb, 0)
    with pytest.raises(ValueError, match="max_size"):
        cap_buckets(qb, qb, 2.5)
    with pytest.raises(ValueError, match="q_buckets"):
        cap_buckets(qb.float(), qb, 2)
    with pytest.raises(ValueError, match="H % Hkv"):
        cap_buckets(qb, torch.zeros(1, 4, 3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="larger max_size"):
        cap_buckets(torch.full((1, 4, 1), 2 ** 30), torch.full((1, 4, 1), 2 ** 30), 1)
    for bad in (0, -1, 2.0, True, "4"):
        with pytest.raises(ValueError, match="n_bins"):
            cap_buckets(qb, qb, 2, n_bins=bad)


# ------------------------------------------------------------------ sharded on 3 ranks

LENGTHS = [23, 40, 9]


def _sharded_case(rank, seed):
    import torch.distributed as dist
    gen = torch.Generator().manual_seed(seed)
    N = sum(LENGTHS)
    qb = torch.randint(-1, 3, (2, N, 4), generator=gen)
    kb = torch.randint(-1, 3, (2, N, 2), generator=gen)
    lo, hi = sum(LENGTHS[:rank]), sum(LENGTHS[:rank + 1])
    want = cap_buckets(qb, kb, 7)
    got = cap_buckets(qb[:, lo:hi], kb[:, lo:hi], 7, group=dist.group.WORLD)
    assert torch.equal(got[0], want[0][:, lo:hi]) and torch.equal(got[1], want[1][:, lo:hi])


def _disagreeing_case(rank):
    """Sharded arguments that differ on the last rank (B, heads, max_size) or are invalid
    there: every rank raises a ValueError (the same exchange shapes on every rank; no rank
    aborts, waits, or returns ids computed from another rank's mismatched counts), and
    the group is still in step afterwards."""
    import torch.distributed as dist
    last = rank == len(LENGTHS) - 1
    n = LENGTHS[rank]
    qb, kb = torch.zeros(2, n, 4, dtype=torch.long), torch.zeros(2, n, 2, dtype=torch.long)
    group = dist.group.WORLD
    for name, q, k, size in (("B", qb[:1] if last else qb, kb[:1] if last else kb, 7),
                             ("Hkv", qb, kb[..., :1] if last else kb, 7),
                             ("max_size", qb, kb, 5 if last else 7)):
        with pytest.raises(ValueError, match=f"{name} differs between ranks"):
            cap_buckets(q, k, size, group=group)
    with pytest.raises(ValueError, match="q_buckets" if last else r"invalid inputs on rank\(s\) \[2\]"):
        cap_buckets(qb.float() if last else qb, kb, 7, group=group)
    _sharded_case(rank, 0)


def _worker(rank, world, port, seed, outdir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    record_cases(["sharded", "disagreeing"],
                 lambda i, name: _sharded_case(rank, seed) if name == "sharded"
                 else _disagreeing_case(rank), rank, outdir)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("case", ["sharded", "disagreeing"])
def test_cap_sharded(tmp_path_factory, seed, case):
    results = _results(tmp_path_factory, seed)
    assert_ranks_ok(results, len(LENGTHS), case)


_RESULTS = {}


def _results(tmp_path_factory, seed):
    if seed not in _RESULTS:
        _RESULTS[seed] = run_workers(_worker, len(LENGTHS), tmp_path_factory.mktemp("cap"),
                                     ["sharded", "disagreeing"], timeout_s=120,
                                     extra_args=(seed,))
    return _RESULTS[seed]
