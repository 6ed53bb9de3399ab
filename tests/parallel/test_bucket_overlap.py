"""The bucket strategy's pipelined path (chunks > 1: exchanges overlapped with compute)
on gloo, 2-4 processes, against the single-process oracle.

As in ``test_sequence_parallel.py``: each world size is launched once (spawned
processes, a free port, a join timeout) and runs its cases in turn; every rank rebuilds
the same global inputs from a shared seed, takes its (uneven) shard, runs
``sequence_parallel_attention(strategy="bucket")`` with ``overlap_chunks`` set to the
case's chunk count, and compares its output and q/k/v gradient shards (backward of
sum(o * g)) with ``reference_attention`` on the full tensors in float64.

Every case also counts the ``all_to_all_single`` calls of the forward and of the backward
(sync and async): every rank, whatever it owns, must call the same collectives --
3 + 2 * chunks sync/async in the forward, 2 * chunks in the backward (1 chunk: 4 and 2).
"""
from __future__ import annotations

import datetime

import numpy as np
import pytest
import torch

from helpers import assert_ranks_ok, record_cases, world_cases, world_runs

JOIN_TIMEOUT_S = 150
D = 16

# name -> spec; lengths are the per-rank shard lengths (len(lengths) = world size)
_BASE = {
    # world 2
    "w2_lsh_gqa": dict(lengths=[64, 63], B=2, H=4, Hkv=2, buckets="lsh", nb=4),
    "w2_uneven": dict(lengths=[57, 20], B=1, H=2, Hkv=2, buckets="random", nb=4),
    "w2_skewed_half": dict(lengths=[45, 80], B=1, H=2, Hkv=1, buckets="half", nb=6),
    "w2_noncausal_noself": dict(lengths=[40, 33], B=1, H=4, Hkv=2, buckets="random", nb=3,
                                causal=False, include_self=False),
    # world 3
    "w3_uneven": dict(lengths=[37, 64, 11], B=2, H=2, Hkv=1, buckets="random", nb=4),
    "w3_gqa_skewed_half": dict(lengths=[37, 64, 11], B=1, H=4, Hkv=2, buckets="half", nb=6),
    "w3_few_groups": dict(lengths=[30, 9, 41], B=1, H=2, Hkv=1, buckets="random", nb=2),
    "w3_single_group": dict(lengths=[30, 9, 41], B=1, H=2, Hkv=1, buckets="single"),
    "w3_rank1_dropped_noself": dict(lengths=[50, 13, 44], B=1, H=2, Hkv=2, buckets="dropped",
                                    nb=4, drop_rank=1, include_self=False),
    "w3_sparse_ids": dict(lengths=[40, 21, 52], B=1, H=2, Hkv=2, buckets="sparse_ids"),
    "w3_all_dropped": dict(lengths=[10, 5, 7], B=1, H=2, Hkv=1, buckets="all_dropped"),
    # world 4
    "w4_gqa": dict(lengths=[37, 64, 11, 50], B=1, H=4, Hkv=2, buckets="random", nb=4),
    "w4_skewed_half_mqa": dict(lengths=[37, 64, 11, 50], B=2, H=3, Hkv=1, buckets="half",
                               nb=8),
    "w4_rank0_dropped_noself": dict(lengths=[20, 41, 33, 9], B=1, H=2, Hkv=2,
                                    buckets="dropped", nb=3, drop_rank=0,
                                    include_self=False),
    "w4_few_groups_f32": dict(lengths=[12, 30, 7, 25], B=1, H=2, Hkv=1, buckets="random",
                              nb=2, dtype=torch.float32),
}
CASES = {}
for _name, _spec in _BASE.items():
    for _k in (2, 3):
        CASES[f"{_name}_c{_k}"] = dict(_spec, chunks=_k)
# the unpipelined path through the same counting (its collective count differs)
CASES["w2_lsh_gqa_c1"] = dict(_BASE["w2_lsh_gqa"], chunks=1)
# inside a non-reentrant activation checkpoint (one group: a rank owning nothing, empty
# chunks; and several groups): each chunk's inner graph must not re-trigger the recompute
CASES["w2_single_group_ckpt_c2"] = dict(lengths=[30, 20], B=1, H=2, Hkv=1, buckets="single",
                                        chunks=2, ckpt=True)
CASES["w3_few_groups_ckpt_c2"] = dict(_BASE["w3_few_groups"], chunks=2, ckpt=True)
CASES["w2_mismatch"] = dict(lengths=[20, 30], kind="mismatch")
CASES["w3_invalid_chunks"] = dict(lengths=[20, 30, 10], kind="invalid")
WORLDS = {w: [n for n, c in CASES.items() if len(c["lengths"]) == w] for w in (2, 3, 4)}


# ---------------------------------------------------------------------------------------------
# worker side
# ---------------------------------------------------------------------------------------------

class _CountA2A:
    """Counts ``torch.distributed.all_to_all_single`` calls (the bucket strategy and
    ``_comm`` look it up on the module at call time)."""

    def __init__(self):
        import torch.distributed as dist
        self.dist, self.orig, self.n = dist, dist.all_to_all_single, 0
        dist.all_to_all_single = self

    def __call__(self, *a, **kw):
        self.n += 1
        return self.orig(*a, **kw)


def _check_case(name, spec, rank, world, seed, counter):
    from helpers import sp_case, sp_check_shard

    from dist_sparse_attn.parallel import sequence_parallel_attention as spa

    lengths = spec["lengths"]
    lo, hi = sum(lengths[:rank]), sum(lengths[:rank + 1])
    gen = torch.Generator().manual_seed(seed)
    if spec.get("kind") in ("mismatch", "invalid"):
        q = torch.randn(1, hi - lo, 2, D, generator=gen, dtype=torch.float64)
        b = torch.randint(0, 3, (1, hi - lo, 2), generator=gen)
        if spec["kind"] == "mismatch":      # rank 1 pipelines, rank 0 does not
            chunks = 2 if rank == 1 else 1
            msg = "differs between ranks"
        else:                               # an invalid value on the last rank only
            chunks = "two" if rank == world - 1 else 2
            msg = "integer" if rank == world - 1 else rf"invalid inputs on rank\(s\) \[{world - 1}\]"
        with pytest.raises(ValueError, match=msg):
            spa(q, q, q, b, b, backend="torch", overlap_chunks=chunks)
        # the group is still in step
        assert spa(q, q, q, b, b, backend="torch", overlap_chunks=2).shape == q.shape
        return

    case = sp_case(spec, D, gen)
    qb, kb = case["qb"], case["kb"]
    K = spec["chunks"]
    shard = [case[x][:, lo:hi].clone().requires_grad_(True) for x in "qkv"]
    n0 = counter.n
    if spec.get("ckpt"):
        from torch.utils.checkpoint import checkpoint
        # "* ones" after the attention saves a tensor, so the backward recomputes the
        # block through the attention (once: the recompute stops at the last saved tensor)
        o = checkpoint(lambda q_, k_, v_: spa(q_, k_, v_, qb[:, lo:hi], kb[:, lo:hi],
                                              strategy="bucket", backend="torch",
                                              overlap_chunks=K, **case["kw"])
                       * torch.ones_like(q_),
                       *shard, use_reentrant=False)
    else:
        o = spa(*shard, qb[:, lo:hi], kb[:, lo:hi], strategy="bucket", backend="torch",
                overlap_chunks=K, **case["kw"])
    n_fwd = counter.n - n0
    grads = torch.autograd.grad(o, shard, case["g"][:, lo:hi], allow_unused=True)
    n_bwd = counter.n - n0 - n_fwd
    sp_check_shard(case, o, grads, lo, hi)
    if max(int(qb.max()), int(kb.max())) < 0:
        want = (0, 0)           # every token dropped: returns before any exchange
    else:
        want = (6, 4) if K == 1 else (2 + 2 * K, 2 * K)   # K=1: q, k, v separately
        if spec.get("ckpt"):    # the backward recomputes the forward once, no more
            want = (want[0], want[1] + want[0])
    assert (n_fwd, n_bwd) == want, f"all_to_all_single calls fwd/bwd {(n_fwd, n_bwd)} != {want}"


def _worker(rank, world, port, names, seed, outdir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    counter = _CountA2A()
    record_cases(names, lambda i, name: _check_case(name, CASES[name], rank, world, seed + i,
                                                    counter), rank, outdir)


# ---------------------------------------------------------------------------------------------
# test side
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world_results(tmp_path_factory):
    return world_runs(_worker, WORLDS, JOIN_TIMEOUT_S, tmp_path_factory, "overlap")


@pytest.mark.timeout(200)
@pytest.mark.parametrize("world,case", **world_cases(WORLDS))
def test_bucket_overlap(world_results, world, case):
    assert_ranks_ok(world_results(world), world, case)


def test_overlap_chunks_setting():
    """``overlap_chunks``: a keyword of every entry point, default 1 (the unpipelined
    path); any integer >= 1 is taken, anything else is a ValueError naming it."""
    import inspect

    from dist_sparse_attn import SequenceParallelSparseAttention, parallel
    from dist_sparse_attn.parallel._comm import check_overlap_chunks
    for fn in (parallel.sequence_parallel_attention, parallel.sequence_parallel_hash_attention,
               parallel.sequence_parallel_qk_attention, parallel.bucket_parallel_attention,
               SequenceParallelSparseAttention):
        p = inspect.signature(fn).parameters["overlap_chunks"]
        assert p.default == 1 and p.kind is p.KEYWORD_ONLY, fn
    assert check_overlap_chunks(1) == 1
    assert check_overlap_chunks(3) == 3 and check_overlap_chunks(np.int64(2)) == 2
    for bad in (0, -1, 1.5, "2", "x", True, None):
        with pytest.raises(ValueError, match="overlap_chunks must be an integer"):
            check_overlap_chunks(bad)
    with pytest.raises(ValueError, match="overlap_chunks"):
        SequenceParallelSparseAttention(None, "hash", 4, overlap_chunks=0)
    assert SequenceParallelSparseAttention(None, "hash", 4, overlap_chunks=3).overlap_chunks == 3
