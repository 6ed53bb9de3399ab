"""Routing of the bucket strategy: who owns each group, and which items travel where.

Hash-sparse attention only connects tokens of the same bucket, so every
(batch b, kv head j, bucket) *group* is an independent attention problem. This
module decides, identically on every rank, which rank owns each group and how
the items travel; :mod:`.bucket` runs the exchange (rows out, local attention,
outputs back) that this plans.

* :func:`item_groups` -- every q item (token, query head) and k item (token, kv
  head) gets its global position and group id (:func:`group_index` numbers the
  groups: dense keys ``(b * Hkv + j) * nb + bucket`` when the table is small, else
  the distinct keys of all ranks, gathered and numbered in sorted order).
* :func:`route` -- the global group sizes (one all_reduce, copied to the host
  once), the owners (:func:`lpt_owners`: cost ``n_q * n_k / 2``, longest processing
  time first), the owner's split into pipeline chunks (:func:`chunk_of`), the send
  counts per (chunk, destination) and the receive counts (one count exchange), and
  the send order of the items (one stable sort by destination, no boolean-mask
  indexing): a :class:`Route`.
* :class:`BucketPlan` -- everything the pipelined exchange needs besides q, k, v.

Everything here is deterministic given the global sizes, so every rank computes the
same assignment and the same split without further communication.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import List

import torch
import torch.distributed as dist

from . import _comm

DENSE_GROUPS_MAX = 2 ** 22      # dense (b, j, bucket) tables up to 4M entries (64 MiB of counts)
LPT_EXACT = 64                  # groups per rank placed one by one (heap); then water-filling


# ---------------------------------------------------------------------------------------------
# groups
# ---------------------------------------------------------------------------------------------

@dataclass
class Items:
    """This rank's items: flat over (B, n, H) for q and (B, n, Hkv) for k, v."""
    gid_q: torch.Tensor     # (B*n*H,) int64 group id in [0, n_groups), n_groups when dropped
    gid_k: torch.Tensor     # (B*n*Hkv,)
    pos_q: torch.Tensor     # (B*n*H,) int64 global position
    pos_k: torch.Tensor     # (B*n*Hkv,)
    n_groups: int


def item_groups(q_buckets: torch.Tensor, k_buckets: torch.Tensor, offset: int,
                max_bucket: int, group) -> Items:
    """Group id and global position of every item of this rank's shard.

    q_buckets (B, n, H), k_buckets (B, n, Hkv) integer (negative: dropped); ``offset``:
    the global position of this shard's first token; ``max_bucket``: the largest bucket
    id on any rank (>= 0). Collective when the groups need :func:`group_index`'s gathers.
    """
    B, n, H = q_buckets.shape
    Hkv = k_buckets.shape[2]
    g = H // Hkv
    dev = q_buckets.device
    nb = max_bucket + 1
    t_q = torch.arange(n, device=dev)[None, :, None].expand(B, n, H)          # (B, n, H)
    j_q = (torch.arange(H, device=dev) // g)[None, None, :]                   # (1, 1, H)
    b_q = torch.arange(B, device=dev)[:, None, None]                          # (B, 1, 1)
    qb = q_buckets.long()
    key_q = ((b_q * Hkv + j_q) * nb + qb).reshape(-1)                         # (B*n*H,)
    valid_q = (qb >= 0).reshape(-1)
    pos_q = (t_q + offset).reshape(-1)
    j_k = torch.arange(Hkv, device=dev)[None, None, :]                        # (1, 1, Hkv)
    kb = k_buckets.long()
    key_k = ((b_q * Hkv + j_k) * nb + kb).reshape(-1)                         # (B*n*Hkv,)
    valid_k = (kb >= 0).reshape(-1)
    pos_k = (torch.arange(n, device=dev)[None, :, None].expand(B, n, Hkv) + offset).reshape(-1)
    gid_q, gid_k, n_groups = group_index(key_q, valid_q, key_k, valid_k, B * Hkv * nb, group)
    return Items(gid_q, gid_k, pos_q, pos_k, n_groups)


def group_index(key_q, valid_q, key_k, valid_k, n_dense: int, group):
    """Number the (b, j, bucket) groups identically on every rank.

    key_q/key_k: every item's dense key (b * Hkv + j) * nb + bucket; valid_*: not dropped.
    Dense keys are used as they are when the table is small; otherwise the distinct
    keys of all ranks are gathered (padded to equal sizes) and numbered in sorted order.
    Returns (gid_q, gid_k, G): per item, its group id in [0, G) or G when dropped.
    """
    if n_dense <= DENSE_GROUPS_MAX:
        return (torch.where(valid_q, key_q, n_dense), torch.where(valid_k, key_k, n_dense),
                n_dense)
    local = torch.unique(torch.cat([key_q[valid_q], key_k[valid_k]]))          # sorted
    counts = _comm.all_gather_equal(torch.tensor([local.numel()], device=local.device),
                                    group).flatten()
    width = max(int(counts.max()), 1)
    padded = torch.full((width,), -1, dtype=torch.int64, device=local.device)
    padded[:local.numel()] = local
    every = _comm.all_gather_equal(padded, group).flatten()
    keys = torch.unique(every[every >= 0])                                    # (G,) sorted
    G = keys.numel()
    if G >= 2 ** 31 - 1:
        raise ValueError(f"too many (batch, kv head, bucket) groups: {G}")
    gq = torch.searchsorted(keys, key_q).clamp_(max=max(G - 1, 0))
    gk = torch.searchsorted(keys, key_k).clamp_(max=max(G - 1, 0))
    return torch.where(valid_q, gq, G), torch.where(valid_k, gk, G), G


# ---------------------------------------------------------------------------------------------
# owners and chunks
# ---------------------------------------------------------------------------------------------

def lpt_owners(n_q: torch.Tensor, n_k: torch.Tensor, P: int) -> torch.Tensor:
    """Owner rank of every group, balancing the cost n_q * n_k / 2.

    The ``LPT_EXACT * P`` costliest groups go by longest-processing-time-first (a
    heap); the remaining, smaller ones fill the ranks' shortfalls below the mean load
    in one vectorised pass (cumulative costs against the ranks' cumulative deficits):
    every rank ends within the largest group's cost of the mean, as with plain LPT, and
    thousands of groups (1M tokens, 2048 buckets, 12 heads: 24576) take ~1 ms instead of
    a Python loop of ~14 ms per call.

    Deterministic (integer costs, ties broken by group id and then by rank; the same
    float64 arithmetic everywhere), so every rank computes the same assignment. Groups
    without queries or without keys are not routed (-1): their outputs are 0.
    """
    owner = torch.full_like(n_q, -1)
    live = ((n_q > 0) & (n_k > 0)).nonzero().flatten()
    if live.numel() == 0:
        return owner
    cost = n_q[live] * n_k[live]                                              # 2 * the cost
    # descending cost, ascending group id for ties (stable sort of ids ascending)
    order = torch.sort(cost, descending=True, stable=True).indices
    gids, cost = live[order], cost[order]
    K = min(len(cost), LPT_EXACT * P)
    loads = [(0, r) for r in range(P)]                                       # (load, rank) heap
    assign: List[int] = []
    for c in cost[:K].tolist():
        load, r = heapq.heappop(loads)
        assign.append(r)
        heapq.heappush(loads, (load + c, r))
    ranks = torch.tensor(assign, dtype=owner.dtype)
    if K < len(cost):
        rest = cost[K:].double()
        load = torch.zeros(P, dtype=torch.float64)
        for ld, r in loads:
            load[r] = float(ld)
        deficit = (cost.double().sum() / P - load).clamp_(min=0)              # (P,)
        # scale the deficits to the remaining cost, lay them end to end, and give each
        # group to the rank whose stretch holds the group's midpoint
        bounds = torch.cumsum(deficit * (rest.sum() / deficit.sum()), 0)      # (P,)
        mid = torch.cumsum(rest, 0) - rest / 2
        rest_ranks = torch.searchsorted(bounds, mid, right=True).clamp_(max=P - 1)
        ranks = torch.cat([ranks, rest_ranks.to(owner.dtype)])
    owner[gids] = ranks
    return owner


def chunk_of(owner: torch.Tensor, n_q: torch.Tensor, n_k: torch.Tensor, P: int,
             K: int) -> torch.Tensor:
    """Chunk in [0, K) of every routed group (-1 unrouted): within each owner its groups are
    split by cost n_q * n_k with :func:`lpt_owners` over K "ranks". Deterministic (the
    same global sizes on every rank)."""
    chunk = torch.full_like(owner, -1)
    live = (owner >= 0).nonzero().flatten()                                   # ascending gid
    if live.numel() == 0:
        return chunk
    by_owner = torch.sort(owner[live], stable=True)                           # gid order kept
    per_owner = torch.bincount(by_owner.values, minlength=P).tolist()         # (P,)
    for gids in torch.split(live[by_owner.indices], per_owner):
        if gids.numel():
            chunk[gids] = lpt_owners(n_q[gids], n_k[gids], K)
    return chunk


# ---------------------------------------------------------------------------------------------
# the route
# ---------------------------------------------------------------------------------------------

@dataclass
class Route:
    """Where this rank's items go, per pipeline chunk c in [0, K) (K = 1: one exchange).

    Items of chunk c are sent in the order of ``idx_q[c]`` / ``idx_k[c]``: by destination
    rank, ascending item index within a destination (the order the owner's kernel
    stream expects). Counts are host lists, per chunk and peer rank."""
    K: int
    P: int
    idx_q: List[torch.Tensor]   # K x (Sq_c,) int64 flat q item indices, in send order
    idx_k: List[torch.Tensor]   # K x (Sk_c,) flat k (and v) item indices
    sq: List[List[int]]         # [K][P] q items sent to each rank
    sk: List[List[int]]         # [K][P] k items sent to each rank
    rq: List[List[int]]         # [K][P] q items received from each rank
    rk: List[List[int]]         # [K][P] k items received from each rank


def route(items: Items, K: int, group) -> Route:
    """The owners of all groups and this rank's :class:`Route` for K chunks.

    Collectives, in this order on every rank: one all_reduce of the group sizes and one
    all_to_all of the counts (the two host synchronisations of the strategy)."""
    P = dist.get_world_size(group)
    dev = items.gid_q.device
    G = items.n_groups
    # One device->host copy for the cost-balanced assignment; the send counts follow on
    # the host from the local sizes, so the only other sync is the count exchange.
    local = torch.stack([torch.bincount(items.gid_q, minlength=G + 1),
                         torch.bincount(items.gid_k, minlength=G + 1)])[:, :G]  # (2, G)
    total = local.clone()
    dist.all_reduce(total, group=group)
    total, local = torch.stack([total, local]).cpu().unbind(0)                # (2, G) each
    owner = lpt_owners(total[0], total[1], P)                                 # (G,), -1 unrouted
    routed = owner >= 0
    # slot = chunk * P + owner: sorting by slot puts chunk 0's items first, by destination
    if K > 1:
        slot = torch.where(routed, chunk_of(owner, total[0], total[1], P, K) * P + owner,
                           K * P)                                             # (G,)
    else:
        slot = torch.where(routed, owner, P)
    send = torch.zeros(K * P, 2, dtype=torch.int64).index_add_(
        0, slot[routed], local[:, routed].T).view(K, P, 2)                    # (K, P, 2)
    # the count exchange wants row s = what goes to rank s: (P, K * 2)
    recv = _comm.exchange_counts(send.transpose(0, 1).reshape(P, 2 * K).to(dev), group)
    recv = recv.cpu().view(P, K, 2).transpose(0, 1)                           # (K, P, 2)
    sq, sk = send[..., 0].tolist(), send[..., 1].tolist()                     # [K][P]
    rq, rk = recv[..., 0].tolist(), recv[..., 1].tolist()
    # stable sort by slot (unrouted and dropped last), then cut per chunk
    slot_of = torch.cat([slot, torch.tensor([K * P])]).to(dev)               # (G + 1,)
    order_q = torch.sort(slot_of[items.gid_q], stable=True).indices
    order_k = torch.sort(slot_of[items.gid_k], stable=True).indices
    idx_q = list(torch.split(order_q[:sum(map(sum, sq))], [sum(s) for s in sq]))
    idx_k = list(torch.split(order_k[:sum(map(sum, sk))], [sum(s) for s in sk]))
    return Route(K, P, idx_q, idx_k, sq, sk, rq, rk)


@dataclass
class BucketPlan:
    """Everything the pipelined exchange (:class:`.bucket._PipelinedAttention`) needs
    besides q, k, v: the route, the received metadata of every chunk, the call's
    shapes and attention arguments. Host lists and index tensors; built once per call,
    used by the forward and the backward."""
    route: Route
    group: object                       # the process group (None: the default group)
    shape_q: tuple                      # (B, n, H, D)
    shape_k: tuple                      # (B, n, Hkv, D)
    rpos_q: List[torch.Tensor]          # K x (Mq_c,) int64 received q positions
    rgid_q: List[torch.Tensor]          # K x (Mq_c,) int64 received q group ids
    rpos_k: List[torch.Tensor]          # K x (Mk_c,)
    rgid_k: List[torch.Tensor]          # K x (Mk_c,)
    causal: bool
    include_self: bool
    scale: float
    backend: str
    graph: bool                         # build each chunk's graph for the backward

    @property
    def K(self) -> int:
        return self.route.K

    @property
    def D(self) -> int:
        return self.shape_q[-1]
