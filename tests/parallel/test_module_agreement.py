"""``SequenceParallelSparseAttention`` on 2 gloo processes: ranks that disagree on the
module's options (including the rules that make buckets on each rank: block-local
heads, the bucket cap, the keep rule), on whether positions are given, or on the
mode (mode "none" included), and an invalid input on one rank only, raise a
ValueError on every rank -- never a wrong result, an aborted process or a wait in a
collective. After every case the group is still in step: a valid call on every rank
equals the single-process module on the whole sequence.

Each case runs on both ranks in turn; the worker writes "ok" or its traceback per
case and the tests read those files.
"""
from __future__ import annotations

import datetime
import re

import pytest
import torch

from helpers import assert_ranks_ok, base_seed, record_cases, run_workers

WORLD = 2
N_LOCAL, H, HKV, D = 8, 4, 2, 8
JOIN_TIMEOUT_S = 240
PG_TIMEOUT_S = 60       # a case that waits in a collective fails the test instead of hanging

# name -> (options on rank 0, options on rank 1, call on rank 0, call on rank 1, the
# message every rank must raise: the differing option, or None when rank 1's input is
# invalid (rank 1 raises its own error matching FAILS_ON_1[name], rank 0 names rank 1))
_HASH = dict(mode="hash", n_buckets=4)
CASES = {
    "local_heads_seed": (dict(_HASH, local_heads=1, seed=0), dict(_HASH, local_heads=1, seed=1),
                         {}, {}, "seed"),
    "local_heads_n_buckets": (dict(_HASH, local_heads=1), dict(_HASH, n_buckets=8, local_heads=1),
                              {}, {}, "n_buckets"),
    "local_heads": (dict(_HASH, local_heads=1), dict(_HASH, local_heads=2), {}, {},
                    "local_heads"),
    "local_heads_on_one_rank": (dict(_HASH), dict(_HASH, local_heads=1), {}, {}, "local_heads"),
    "local_window": (dict(_HASH, local_heads=1, local_window=4),
                     dict(_HASH, local_heads=1, local_window=8), {}, {}, "local_window"),
    "cap_seed": (dict(_HASH, bucket_cap=1.0, seed=0), dict(_HASH, bucket_cap=1.0, seed=1),
                 {}, {}, "seed"),
    "bucket_cap": (dict(_HASH, bucket_cap=1.0), dict(_HASH, bucket_cap=2.0), {}, {},
                   "bucket_cap"),
    "cap_on_one_rank": (dict(_HASH), dict(_HASH, bucket_cap=1.0), {}, {}, "bucket_cap"),
    "keep_rate": (dict(mode="qk", keep_rate=0.5), dict(mode="qk", keep_rate=0.9), {}, {},
                  "keep_rate"),
    "keep_seed": (dict(mode="qk", keep_rate=0.5, seed=0), dict(mode="qk", keep_rate=0.5, seed=1),
                  {}, {}, "seed"),
    "positions_on_one_rank": (dict(_HASH, local_heads=1), dict(_HASH, local_heads=1),
                              {"positions": "global"}, {}, "positions given"),
    "keep_positions_on_one_rank": (dict(mode="qk", keep_rate=0.5), dict(mode="qk", keep_rate=0.5),
                                   {"positions": "global"}, {}, "positions given"),
    "none_vs_hash": (dict(mode="none"), dict(_HASH), {}, {}, "mode"),
    "qk_vs_hash": (dict(mode="qk", keep_rate=0.5, strategy="bucket"), dict(_HASH), {}, {},
                   "mode"),
    "none_heads": (dict(mode="none"), dict(mode="none"), {}, {"heads": 2}, "H"),
    "local_heads_too_many_on_1": (dict(_HASH, local_heads=1), dict(_HASH, local_heads=3), {}, {},
                                  None),
    "negative_positions_on_1": (dict(_HASH, local_heads=1), dict(_HASH, local_heads=1),
                                {"positions": "global"}, {"positions": "negative"}, None),
    "int_q_on_1": (dict(mode="qk", keep_rate=0.5), dict(mode="qk", keep_rate=0.5), {},
                   {"dtype": torch.int64}, None),
    "q_keep_on_1": (dict(_HASH), dict(_HASH), {}, {"q_keep": True}, "tensors given"),
}
FAILS_ON_1 = {"local_heads_too_many_on_1": "local_heads", "negative_positions_on_1": "positions",
              "int_q_on_1": "dtype"}


def _inputs(rank, call, gen):
    """This rank's shard (B=1) of q, k, v and the forward keywords of ``call``."""
    heads = call.get("heads", H)
    q = torch.randn(1, N_LOCAL, heads, D, generator=gen)
    k, v = (torch.randn(1, N_LOCAL, HKV, D, generator=gen) for _ in range(2))
    if "dtype" in call:
        q = (q * 10).to(call["dtype"])
    kw = {}
    if call.get("positions") == "global":
        kw["positions"] = torch.arange(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    elif call.get("positions") == "negative":
        kw["positions"] = torch.arange(N_LOCAL) - N_LOCAL
    if call.get("q_keep"):
        kw["q_keep"] = torch.ones(1, N_LOCAL, heads, dtype=torch.bool)
    return q, k, v, kw


def _still_in_step(rank, gen):
    """A valid call on every rank: equal to the one-process module on the whole sequence."""
    from dist_sparse_attn import SequenceParallelSparseAttention, SparseAttention
    opts = dict(_HASH, local_heads=1, local_window=4, bucket_cap=1.5, seed=3, backend="torch")
    q, k, v = (torch.randn(1, WORLD * N_LOCAL, h, D, generator=gen) for h in (H, HKV, HKV))
    lo, hi = rank * N_LOCAL, (rank + 1) * N_LOCAL
    got = SequenceParallelSparseAttention(None, **opts)(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi])
    want = SparseAttention(**opts)(q, k, v)[:, lo:hi]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _check(name, rank, seed):
    from dist_sparse_attn import SequenceParallelSparseAttention
    opts0, opts1, call0, call1, differs = CASES[name]
    gen = torch.Generator().manual_seed(seed * 10 + rank)
    opts, call = (opts1, call1) if rank == 1 else (opts0, call0)
    q, k, v, kw = _inputs(rank, call, gen)
    module = SequenceParallelSparseAttention(None, backend="torch", **opts)
    if differs is not None:
        match = f"{re.escape(differs)}[^:]* differs between ranks"
    elif rank == 1:
        match = FAILS_ON_1[name]
    else:
        match = r"invalid inputs on rank\(s\) \[1\]"
    with pytest.raises(ValueError, match=match):
        module(q, k, v, **kw)
    _still_in_step(rank, torch.Generator().manual_seed(seed))


def _worker(rank, world, port, names, seed, outdir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    record_cases(names, lambda i, name: _check(name, rank, seed + i), rank, outdir)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_workers(_worker, WORLD, tmp_path_factory.mktemp("agreement"), list(CASES),
                       JOIN_TIMEOUT_S, extra_args=(list(CASES), base_seed()))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", list(CASES))
def test_module_ranks_agree(results, case):
    assert_ranks_ok(results, WORLD, case)
