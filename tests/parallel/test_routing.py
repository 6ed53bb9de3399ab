"""The bucket strategy's routing (:mod:`dist_sparse_attn.parallel.routing`): the LPT
assignment of (batch, kv head, bucket) groups to ranks and the split of each rank's
groups into overlap chunks, against the bounds they promise (every rank or chunk within
the largest group's cost of the mean) and direct counts."""
import pytest
import torch

from dist_sparse_attn.parallel.routing import LPT_EXACT, chunk_of, lpt_owners


def test_lpt_balances_skewed_groups():
    """LPT on cost n_q * n_k: every rank within the largest group's cost of the mean,
    groups without queries or keys unrouted, same answer on every call."""
    n_q = torch.randint(1, 50, (200,))
    n_k = torch.randint(1, 50, (200,))
    n_q[0], n_k[0] = 400, 400        # one heavy group
    n_q[5], n_k[7] = 0, 0
    P = 4
    owner = lpt_owners(n_q, n_k, P)
    assert owner[5] == -1 and owner[7] == -1
    assert ((owner >= 0) == ((n_q > 0) & (n_k > 0))).all()
    cost = (n_q * n_k).double()
    loads = torch.stack([cost[owner == r].sum() for r in range(P)])
    small = cost.clone()
    small[0] = 0
    # the heavy group's rank gets nothing else once it exceeds the mean of the rest
    assert loads.max() <= max(cost[0].item(), loads.mean().item() + small.max().item())
    assert (loads[loads < cost[0]] - (cost.sum() - cost[0]) / (P - 1)).abs().max() \
        <= small.max()
    assert torch.equal(owner, lpt_owners(n_q, n_k, P))


@pytest.mark.parametrize("G,P", [(3000, 4), (5000, 8), (700, 3)])
def test_lpt_many_groups_water_filling(G, P, seed):
    """Beyond LPT_EXACT * P groups the small ones fill the ranks' deficits: every
    rank still within the largest group's cost of the mean, unrouted groups -1,
    deterministic -- with one group heavier than a rank's fair share too."""
    assert G > LPT_EXACT * P
    g = torch.Generator().manual_seed(seed + G + P)
    n_q = torch.randint(0, 60, (G,), generator=g)
    n_k = torch.randint(0, 60, (G,), generator=g)
    n_q[3], n_k[3] = 2000, 2000                       # heavier than the mean load
    owner = lpt_owners(n_q, n_k, P)
    assert ((owner >= 0) == ((n_q > 0) & (n_k > 0))).all()
    cost = (n_q * n_k).double()
    loads = torch.stack([cost[owner == r].sum() for r in range(P)])
    light = loads[loads < cost[3]]                    # ranks other than the heavy group's
    assert loads.max() <= max(cost[3].item(), loads.mean().item() + cost.max().item())
    rest_mean = (cost.sum() - cost[3]) / (P - 1)
    others = cost.clone()
    others[3] = 0
    assert (light - rest_mean).abs().max() <= others.max(), (loads, rest_mean)
    assert torch.equal(owner, lpt_owners(n_q, n_k, P))


def test_chunk_split_balanced_and_deterministic(seed):
    """Within every owner the chunks split its groups by cost (LPT: each chunk within the
    owner's largest group of the owner's mean), every routed group gets a chunk, unrouted
    ones -1, the same answer on every call."""
    g = torch.Generator().manual_seed(seed)
    G, P, K = 400, 3, 3
    n_q = torch.randint(0, 40, (G,), generator=g)
    n_k = torch.randint(0, 40, (G,), generator=g)
    n_q[:5], n_k[:5] = 300, 300             # a few heavy groups
    owner = lpt_owners(n_q, n_k, P)
    chunk = chunk_of(owner, n_q, n_k, P, K)
    assert ((chunk >= 0) == (owner >= 0)).all() and chunk.max() < K
    assert torch.equal(chunk, chunk_of(owner, n_q, n_k, P, K))
    cost = (n_q * n_k).double()
    for r in range(P):
        mine = owner == r
        loads = torch.stack([cost[mine & (chunk == c)].sum() for c in range(K)])
        assert (loads - loads.mean()).abs().max() <= cost[mine].max()
    assert torch.equal(chunk_of(torch.full((4,), -1), n_q[:4], n_k[:4], P, K),
                       torch.full((4,), -1))
