"""Sequence-parallel strategies on gloo, 2-4 processes, against the single-process oracle.

Each world size is launched once (spawned processes, a free port, a join
timeout) and runs all its cases in turn; every rank rebuilds the same global
inputs from a shared seed, takes its shard (uneven lengths), runs the strategy
and compares its output shard and its q/k/v gradient shards (backward of
sum(o * g)) with ``reference_attention`` on the full tensors in float64. A
worker writes "ok" or its traceback per case; the tests read those files.
Cases of kind "hash" / "module" check the conveniences and
``SequenceParallelSparseAttention`` against the functional API.

``test_failed_rank_raises_within_timeout`` makes one rank of a 3-rank group
exit (or stall) before a collective and checks that the others raise within
the process-group timeout.
"""
from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.multiprocessing as mp

from helpers import assert_ranks_ok, free_port, record_cases, world_cases, world_runs

JOIN_TIMEOUT_S = 240

# name -> spec; lengths are the per-rank shard lengths (so len(lengths) = world size)
CASES = {
    # world 2
    "bucket_w2": dict(lengths=[57, 70], B=2, H=2, Hkv=2, buckets="random", nb=4),
    "bucket_w2_noncausal_gqa": dict(lengths=[45, 80], B=1, H=4, Hkv=2, buckets="random", nb=3,
                                    causal=False),
    "bucket_w2_lsh": dict(lengths=[64, 63], B=2, H=4, Hkv=2, buckets="lsh", nb=4),
    "ulysses_w2_gqa": dict(lengths=[45, 80], B=2, H=4, Hkv=2, buckets="random", nb=4,
                           strategy="ulysses"),
    "ulysses_w2_dropped": dict(lengths=[70, 31], B=1, H=2, Hkv=2, buckets="dropped", nb=3,
                               strategy="ulysses", include_self=False),
    "errors_w2": dict(lengths=[20, 30], kind="errors"),
    "disagree_w2": dict(lengths=[20, 30], kind="disagree"),
    # world 3
    "bucket_w3": dict(lengths=[37, 64, 11], B=2, H=2, Hkv=1, buckets="random", nb=4),
    "bucket_w3_gqa_skewed": dict(lengths=[37, 64, 11], B=1, H=4, Hkv=2, buckets="skewed", nb=6),
    "bucket_w3_dropped": dict(lengths=[50, 13, 44], B=2, H=2, Hkv=2, buckets="dropped", nb=4),
    "bucket_w3_exclude_self": dict(lengths=[37, 64, 11], B=1, H=4, Hkv=2, buckets="random",
                                   nb=3, include_self=False),
    "bucket_w3_sparse_ids": dict(lengths=[40, 21, 52], B=1, H=2, Hkv=2, buckets="sparse_ids"),
    "bucket_w3_all_dropped": dict(lengths=[10, 5, 7], B=1, H=2, Hkv=1, buckets="all_dropped"),
    "bucket_w3_one_group_f32": dict(lengths=[30, 9, 41], B=1, H=2, Hkv=1, buckets="single",
                                    dtype=torch.float32),
    "ulysses_w3_indivisible": dict(lengths=[37, 64, 11], kind="ulysses_error"),
    # world 4
    # world 2: allgather (QK-sparse), conveniences, module
    "allgather_w2_keep_gqa": dict(lengths=[57, 70], B=2, H=4, Hkv=2, buckets="keep",
                                  strategy="allgather"),
    "allgather_w2_rank0_dropped": dict(lengths=[45, 80], B=1, H=2, Hkv=1, buckets="keep",
                                       drop_rank=0, strategy="allgather"),
    "hash_convenience_w2": dict(lengths=[64, 63], B=2, H=4, Hkv=2, nb=4, kind="hash"),
    "hash_convenience_w2_product": dict(lengths=[90, 71], B=1, H=4, Hkv=2, nb=134, kind="hash"),
    "module_w2": dict(lengths=[45, 80], B=1, H=4, Hkv=2, nb=4, kind="module"),
    # world 3: allgather
    "allgather_w3_keep_gqa": dict(lengths=[37, 64, 11], B=2, H=4, Hkv=2, buckets="keep",
                                  strategy="allgather"),
    "allgather_w3_rank1_dropped_f32": dict(lengths=[50, 13, 44], B=1, H=2, Hkv=2,
                                           buckets="keep", drop_rank=1, strategy="allgather",
                                           dtype=torch.float32),
    "allgather_w3_buckets_exclude_self": dict(lengths=[37, 64, 11], B=1, H=3, Hkv=1,
                                              buckets="dropped", nb=3, include_self=False,
                                              strategy="allgather"),
    "allgather_w3_noncausal": dict(lengths=[20, 41, 33], B=1, H=2, Hkv=2, buckets="keep",
                                   causal=False, strategy="allgather"),
    "allgather_w3_no_keys": dict(lengths=[10, 5, 7], B=1, H=2, Hkv=1, buckets="no_keys",
                                 strategy="allgather"),
    "allgather_w3_all_dropped": dict(lengths=[10, 5, 7], B=1, H=2, Hkv=1,
                                     buckets="all_dropped", strategy="allgather"),
    "bucket_w4_gqa": dict(lengths=[37, 64, 11, 50], B=1, H=4, Hkv=2, buckets="random", nb=4),
    "bucket_w4_skewed_mqa": dict(lengths=[37, 64, 11, 50], B=2, H=3, Hkv=1, buckets="skewed",
                                 nb=8),
    "bucket_w4_dropped_exclude_self": dict(lengths=[20, 41, 33, 9], B=1, H=2, Hkv=2,
                                           buckets="dropped", nb=2, include_self=False),
}
WORLDS = {w: [n for n, c in CASES.items() if len(c["lengths"]) == w] for w in (2, 3, 4)}
D = 16


# ---------------------------------------------------------------------------------------------
# worker side
# ---------------------------------------------------------------------------------------------

def _check_case(name, spec, rank, world, seed):
    from helpers import sp_case, sp_check_shard

    from dist_sparse_attn.parallel import sequence_parallel_attention as spa

    lengths = spec["lengths"]
    lo, hi = sum(lengths[:rank]), sum(lengths[:rank + 1])
    gen = torch.Generator().manual_seed(seed)
    if spec.get("kind") == "errors":
        q = torch.randn(1, hi - lo, 2, D, generator=gen)
        kb = torch.zeros(1, hi - lo, 2, dtype=torch.long)
        with pytest.raises(ValueError, match="strategy"):
            spa(q, q, q, kb, kb, strategy="ring")
        # a bucket-shape error on rank 1 only: every rank must raise
        kbad = kb[:, :, :1] if rank == 1 else kb
        with pytest.raises(ValueError, match="k_buckets" if rank == 1 else "rank"):
            spa(q, q, q, kb, kbad)
        # head dim differs between ranks (valid locally): every rank must raise
        qd = q[..., :8] if rank == 1 else q
        with pytest.raises(ValueError, match="D differs"):
            spa(qd, qd, qd, kb, kb)
        # the conveniences validate across ranks too: a bad keep-mask on rank 1 only
        from dist_sparse_attn.parallel import (sequence_parallel_hash_attention,
                                               sequence_parallel_qk_attention)
        keep = torch.ones(1, hi - lo, 2, dtype=torch.bool)
        kbad = keep.long() if rank == 1 else keep
        with pytest.raises(ValueError, match="q_keep" if rank == 1 else "rank"):
            sequence_parallel_qk_attention(q, q, q, kbad, keep)
        with pytest.raises(ValueError, match="n_buckets" if rank == 1 else "rank"):
            sequence_parallel_hash_attention(q, q, q, 3 if rank == 1 else 4)
        with pytest.raises(ValueError, match=r"n_buckets must be an even integer in \[2, 2\*\*30\]"
                           if rank == 1 else "rank"):
            sequence_parallel_hash_attention(q, q, q, 2 ** 40 if rank == 1 else 4)
        with pytest.raises(ValueError, match="seed" if rank == 1 else "rank"):
            sequence_parallel_hash_attention(q, q, q, 4, seed="abc" if rank == 1 else 0)
        # the group is still in step: a valid call works afterwards
        assert spa(q, q, q, kb, kb, backend="torch").shape == q.shape
        assert spa(q, q, q, kb, kb, strategy="allgather", backend="torch").shape == q.shape
        return
    if spec.get("kind") == "disagree":
        _check_disagreements(rank, hi - lo, gen)
        return
    if spec.get("kind") == "ulysses_error":
        q = torch.randn(1, hi - lo, 4, D, generator=gen)
        k = torch.randn(1, hi - lo, 2, D, generator=gen)
        with pytest.raises(ValueError, match="divide"):
            spa(q, k, k, torch.zeros(1, hi - lo, 4, dtype=torch.long),
                torch.zeros(1, hi - lo, 2, dtype=torch.long), strategy="ulysses")
        return

    if spec.get("kind") in ("hash", "module"):
        _check_convenience(spec, rank, gen)
        return

    case = sp_case(spec, D, gen)
    shard = [case[x][:, lo:hi].clone().requires_grad_(True) for x in "qkv"]
    o = spa(*shard, case["qb"][:, lo:hi], case["kb"][:, lo:hi],
            strategy=spec.get("strategy", "bucket"), backend="torch", **case["kw"])
    grads = torch.autograd.grad(o, shard, case["g"][:, lo:hi], allow_unused=True)
    sp_check_shard(case, o, grads, lo, hi)


def _check_disagreements(rank, n, gen):
    """Arguments that must agree across ranks but differ on rank 1: every rank raises a
    ValueError naming the argument (unchecked, the ranks would compute a wrong result or
    hang), and the group stays in step."""
    from dist_sparse_attn.parallel import (sequence_parallel_attention as spa,
                                           sequence_parallel_hash_attention as spha,
                                           sequence_parallel_qk_attention as spqk)

    q = torch.randn(1, n, 2, D, generator=gen)
    kb = torch.zeros(1, n, 2, dtype=torch.long)
    keep = torch.ones(1, n, 2, dtype=torch.bool)

    def on1(a, b):          # a on rank 0, b on rank 1
        return b if rank == 1 else a

    def expect(name, fn):
        with pytest.raises(ValueError, match=f"{name} differs between ranks"):
            fn()

    kw = dict(backend="torch")
    expect("n_buckets", lambda: spha(q, q, q, on1(4, 6), seed=3, **kw))
    expect("seed", lambda: spha(q, q, q, 4, seed=on1(3, 4), **kw))
    expect("softmax_scale", lambda: spha(q, q, q, 4, softmax_scale=on1(None, 0.5), **kw))
    expect("softmax_scale", lambda: spa(q, q, q, kb, kb, softmax_scale=on1(0.25, 0.5), **kw))
    expect("causal", lambda: spa(q, q, q, kb, kb, causal=on1(True, False), **kw))
    expect("include_self", lambda: spa(q, q, q, kb, kb, include_self=on1(True, False), **kw))
    expect("causal", lambda: spqk(q, q, q, keep, keep, causal=on1(True, False), **kw))
    expect("strategy", lambda: spa(q, q, q, kb, kb, strategy=on1("bucket", "allgather"), **kw))
    expect("backend", lambda: spa(q, q, q, kb, kb, backend=on1("torch", "triton")))
    qd = on1(q, q.double())
    expect("dtype", lambda: spa(qd, qd, qd, kb, kb, **kw))
    # the same call through different conveniences: hashed on rank 0, given buckets on 1
    expect("mode", lambda: spha(q, q, q, 4, **kw) if rank == 0 else spa(q, q, q, kb, kb, **kw))
    # the bucket strategy's overlap chunks
    expect("overlap_chunks", lambda: spa(q, q, q, kb, kb, overlap_chunks=on1(1, 2), **kw))
    # the strategy functions called directly (public too): a different one on rank 1
    from dist_sparse_attn.parallel import (allgather_attention, bucket_parallel_attention,
                                           ulysses_attention)
    for a, b in ((bucket_parallel_attention, allgather_attention),
                 (ulysses_attention, allgather_attention),
                 (bucket_parallel_attention, ulysses_attention)):
        expect("strategy", lambda: on1(a, b)(q, q, q, kb, kb, **kw))
    # inputs that need gradients on one rank only: its backward would wait for collectives
    # the other rank never runs (q, k, v for "bucket" and "ulysses"; k, v for "allgather",
    # whose backward all-reduces the gathered keys' gradients)
    qg = q.clone().requires_grad_()
    for strategy in ("bucket", "ulysses", "allgather"):
        expect("need gradients", lambda: spa(q, on1(q, qg), q, kb, kb, strategy=strategy, **kw))
    expect("need gradients", lambda: spa(qg, q, q, kb, kb, overlap_chunks=2, **kw)
           if rank == 0 else spa(q, q, q, kb, kb, overlap_chunks=2, **kw))
    with torch.set_grad_enabled(rank == 0):
        expect("need gradients", lambda: spa(qg, qg, qg, kb, kb, **kw))
    # "allgather" with gradients for q on one rank only: its backward runs no collective
    o = spa(on1(q, qg), q, q, kb, kb, strategy="allgather", **kw)
    if rank == 1:
        o.sum().backward()
    # a local error of another type on rank 1 only (here an invalid chunk count):
    # rank 1 raises it, rank 0 learns of it instead of waiting in the next collective
    with pytest.raises(ValueError, match="overlap_chunks" if rank == 1 else "rank"):
        spa(q, q, q, kb, kb, overlap_chunks=on1(1, "two"), **kw)
    # arguments of the wrong type are refused, not read by truthiness
    with pytest.raises(ValueError, match="causal"):
        spa(q, q, q, kb, kb, causal="no", **kw)
    with pytest.raises(ValueError, match="include_self"):
        spha(q, q, q, 4, include_self=None, **kw)
    with pytest.raises(ValueError, match="group"):
        spa(q, q, q, kb, kb, group="world", **kw)
    # still in step: the same valid call on every rank works and agrees with itself
    o = spha(q, q, q, 4, seed=3, **kw)
    assert o.shape == q.shape and torch.isfinite(o).all()


def _check_convenience(spec, rank, gen):
    """kind "hash": sequence_parallel_hash_attention == the bucket strategy given the same
    LSH buckets explicitly == single-device hash_sparse_attention; kind "module": the modules
    (hash and qk modes) == the functional API, forward and gradients."""
    from helpers import assert_close_rel

    from dist_sparse_attn import (SequenceParallelSparseAttention, hash_sparse_attention,
                                  lsh_buckets, qk_sparse_attention)
    from dist_sparse_attn.parallel import (sequence_parallel_attention,
                                           sequence_parallel_hash_attention,
                                           sequence_parallel_qk_attention)

    lengths = spec["lengths"]
    lo, hi = sum(lengths[:rank]), sum(lengths[:rank + 1])
    B, H, Hkv, N, nb = spec["B"], spec["H"], spec["Hkv"], sum(lengths), spec["nb"]
    q = torch.randn(B, N, H, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, N, Hkv, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, N, Hkv, D, generator=gen, dtype=torch.float64)
    g = torch.randn(B, N, H, D, generator=gen, dtype=torch.float64)
    tol = dict(rtol=1e-9, atol=1e-12)

    def run(fn):
        shard = [x[:, lo:hi].clone().requires_grad_(True) for x in (q, k, v)]
        o = fn(*shard)
        return (o, *torch.autograd.grad(o, shard, g[:, lo:hi]))

    if spec["kind"] == "hash":
        got = run(lambda a, b, c: sequence_parallel_hash_attention(a, b, c, nb, seed=7,
                                                                   backend="torch"))
        qb = lsh_buckets(q, nb, seed=7, group_size=H // Hkv)[:, lo:hi]
        kb = lsh_buckets(k, nb, seed=7)[:, lo:hi]
        want = run(lambda a, b, c: sequence_parallel_attention(a, b, c, qb, kb, backend="torch"))
        for x, y in zip(got, want):
            assert torch.equal(x, y)
        full = [x.clone().requires_grad_(True) for x in (q, k, v)]
        o_ref = hash_sparse_attention(*full, nb, seed=7, backend="torch")
        ref = (o_ref, *torch.autograd.grad(o_ref, full, g))
        for nm, x, y in zip(("o", "dq", "dk", "dv"), got, ref):
            assert_close_rel(x, y[:, lo:hi].detach(), name=nm, **tol)
        return

    # module == functional, in hash mode (bucket strategy) and qk mode (allgather)
    q_keep = torch.rand(B, N, H, generator=gen) < 0.6
    k_keep = torch.rand(B, N, Hkv, generator=gen) < 0.6
    qk, kk = q_keep[:, lo:hi], k_keep[:, lo:hi]
    mod = SequenceParallelSparseAttention(None, "hash", nb, seed=5, backend="torch")
    got = run(lambda a, b, c: mod(a, b, c))
    want = run(lambda a, b, c: sequence_parallel_hash_attention(a, b, c, nb, seed=5,
                                                                backend="torch"))
    for x, y in zip(got, want):
        assert torch.equal(x, y)
    mod = SequenceParallelSparseAttention(None, "qk", backend="torch")
    assert mod.strategy == "allgather"
    got = run(lambda a, b, c: mod(a, b, c, qk, kk))
    want = run(lambda a, b, c: sequence_parallel_qk_attention(a, b, c, qk, kk, backend="torch"))
    for x, y in zip(got, want):
        assert torch.equal(x, y)
    full = [x.clone().requires_grad_(True) for x in (q, k, v)]
    o_ref = qk_sparse_attention(*full, q_keep, k_keep, backend="torch")
    ref = (o_ref, *torch.autograd.grad(o_ref, full, g))
    for nm, x, y in zip(("o", "dq", "dk", "dv"), got, ref):
        assert_close_rel(x, y[:, lo:hi].detach(), name=nm, **tol)
    # dense mode (allgather by default) == causal attention over the whole sequence
    mod = SequenceParallelSparseAttention(None, "dense", backend="torch")
    o = mod(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi])
    o_ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(H // Hkv, 2).transpose(1, 2),
        v.repeat_interleave(H // Hkv, 2).transpose(1, 2), is_causal=True).transpose(1, 2)
    assert_close_rel(o, o_ref[:, lo:hi], name="o dense", **tol)


def _worker(rank, world, port, names, seed, outdir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    record_cases(names, lambda i, name: _check_case(name, CASES[name], rank, world, seed + i),
                 rank, outdir)


# ---------------------------------------------------------------------------------------------
# test side
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world_results(tmp_path_factory):
    return world_runs(_worker, WORLDS, JOIN_TIMEOUT_S, tmp_path_factory, "parallel")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world,case", **world_cases(WORLDS))
def test_sequence_parallel(world_results, world, case):
    assert_ranks_ok(world_results(world), world, case)


# ---------------------------------------------------------------------------------------------
# a rank that dies must not hang the others
# ---------------------------------------------------------------------------------------------

PG_TIMEOUT_S = 10


def _failing_worker(rank, world, port, how, outdir):
    """Rank ``world - 1`` exits (how="exit") or stalls (how="stall") before the first
    collective; the others run sequence_parallel_attention and record whether it raised,
    and after how long."""
    import time

    import torch.distributed as dist

    from dist_sparse_attn.parallel import sequence_parallel_attention as spa

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    if rank == world - 1:
        if how == "stall":      # alive but silent: the others must hit the timeout
            time.sleep(6 * PG_TIMEOUT_S)
        os._exit(1)
    q = torch.randn(1, 8, 2, D)
    b = torch.zeros(1, 8, 2, dtype=torch.long)
    t0 = time.monotonic()
    try:
        spa(q, q, q, b, b, backend="torch")
        msg = "returned"
    except Exception as e:  # noqa: BLE001 - what was raised is the result
        msg = f"raised {time.monotonic() - t0:.1f} {type(e).__name__}: {str(e)[:300]}"
    with open(os.path.join(outdir, f"{how}.{rank}"), "w") as f:
        f.write(msg)
    # the group is broken: destroy_process_group could block on the dead peer
    os._exit(0)


@pytest.mark.timeout(120)
def test_failed_rank_raises_within_timeout(tmp_path):
    """Two groups of 3 gloo ranks with a 10 s process-group timeout, run side by side: in
    one, rank 2 dies (os._exit) before the first collective, in the other it stalls.
    Ranks 0 and 1 of both must raise instead of hanging: at once when the peer is gone,
    after the timeout (+ slack) when it stalls."""
    import time
    world = 3
    ctx = mp.get_context("spawn")
    procs = {}
    for how in ("exit", "stall"):
        port = free_port()
        procs[how] = [ctx.Process(target=_failing_worker, args=(r, world, port, how,
                                                                str(tmp_path)), daemon=True)
                      for r in range(world)]
    t0 = time.monotonic()
    for ps in procs.values():
        for p in ps:
            p.start()
    for ps in procs.values():
        for p in ps[:-1]:       # the survivors; the stalled rank is killed below
            p.join(max(1.0, 90 - (time.monotonic() - t0)))
    hung = [(how, r) for how, ps in procs.items() for r, p in enumerate(ps[:-1])
            if p.is_alive()]
    for ps in procs.values():
        for p in ps:
            if p.is_alive():
                p.kill()
                p.join(10)
    assert not hung, f"(scenario, rank) {hung} still running after 90 s"
    for how, ps in procs.items():
        for r in range(world - 1):
            path = tmp_path / f"{how}.{r}"
            assert path.exists(), f"{how}: rank {r} wrote no result (exit code {ps[r].exitcode})"
            msg = path.read_text()
            assert msg.startswith("raised"), f"{how}: rank {r}: {msg}"
            elapsed = float(msg.split()[1])
            assert elapsed < PG_TIMEOUT_S + 30, f"{how}: rank {r} raised after {elapsed} s: {msg}"
            if how == "stall":  # raised by the timeout, not by something else
                assert elapsed >= PG_TIMEOUT_S - 1, f"stall: rank {r}: {msg}"
