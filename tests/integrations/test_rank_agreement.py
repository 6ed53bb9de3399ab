"""Ranks that disagree, or one rank with invalid inputs, raise the same ValueError on
every rank of the group -- never a wrong result, an aborted process or a wait until
the process-group timeout:

* transformers attention registered with ``group=`` and different options per rank
  (mode, seed, keep_rate, n_buckets, bucket_size, local_heads, local_window, strategy);
  a zero-length shard on one rank of a parallelized HFCausalLM;
* a parallelized GPT / HFCausalLM with bad ``targets``, token ids or ``positions`` on
  one rank;
* ``ulysses_sparse_attention(group, "qk")`` with a wrong-shaped ``q_keep`` on one rank;
* ``UlyssesDenseAttention`` with uneven shards or fewer kv heads than ranks.

After the error cases a valid call on every rank still runs (the group is in step).
One 2-process run does every case in turn; each rank writes "ok" or its traceback.
"""
from __future__ import annotations

import datetime
import os
import re

import pytest
import torch

from helpers import assert_ranks_ok, base_seed, record_cases, run_workers

pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

WORLD = 2
JOIN_TIMEOUT_S = 300
PG_TIMEOUT_S = 60       # a case that waits in a collective fails the test instead of hanging
VOCAB = 61

_HASH = dict(mode="hash", n_buckets=4)
# name -> (register options on rank 0, on rank 1, the option named in the error)
HF_OPTIONS = {
    "hf_keep_rate": (dict(mode="qk", keep_rate=1.0), dict(mode="qk", keep_rate=0.5),
                     "keep_rate"),
    "hf_seed": (dict(_HASH, seed=0), dict(_HASH, seed=1), "seed"),
    "hf_mode": (dict(mode="qk"), dict(_HASH), "mode"),
    "hf_n_buckets": (dict(_HASH), dict(mode="hash", n_buckets=8), "n_buckets"),
    "hf_bucket_size": (dict(mode="hash", bucket_size=4), dict(mode="hash", bucket_size=8),
                       "bucket_size"),
    "hf_local_heads": (dict(_HASH), dict(_HASH, local_heads=1), "local_heads"),
    "hf_local_window": (dict(_HASH, local_heads=1, local_window=4),
                        dict(_HASH, local_heads=1, local_window=8), "local_window"),
    "hf_strategy": (dict(_HASH), dict(_HASH, strategy="allgather"), "strategy"),
}
# one rank's invalid input: rank 1 raises naming the argument, rank 0 names rank 1
ONE_RANK = ["hf_empty_shard", "hf_targets_shape", "hf_idx_vocab", "gpt_targets_shape",
            "gpt_idx_vocab", "gpt_positions_shape", "ulysses_q_keep"]
# every rank raises the same error naming what differs
DENSE = ["dense_uneven_shards", "dense_kv_heads"]
CASES = list(HF_OPTIONS) + ONE_RANK + DENSE + ["still_in_step"]
_ON_1 = r"rank\(s\) \[1\]"


def _llama(name, seed):
    from dist_sparse_attn.integrations import transformers as dsa_hf
    torch.manual_seed(seed)
    return dsa_hf.build_llama(vocab_size=VOCAB, n_layer=1, n_embd=32, n_head=4, n_kv_head=2,
                              intermediate_size=32, attn_implementation=name)


def _hf_options_case(name, rank, seed):
    import torch.distributed as dist

    from dist_sparse_attn.integrations import transformers as dsa_hf
    opts = HF_OPTIONS[name][rank]
    reg = dsa_hf.register(f"agree_{name}", group=dist.group.WORLD, backend="torch", **opts)
    model = _llama(reg, seed).model
    n = 9
    ids = torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed + rank))
    pos = torch.arange(rank * n, (rank + 1) * n)[None]
    with pytest.raises(ValueError, match=f"{re.escape(HF_OPTIONS[name][2])}[^:]* differs "
                                         "between ranks"):
        model(input_ids=ids, position_ids=pos, use_cache=False)


def _gpt(seed):
    import torch.distributed as dist

    from dist_sparse_attn.model import parallelize
    return parallelize(_gpt_one(seed), dist.group.WORLD)


def _hf_wrapper(seed, group):
    from dist_sparse_attn.integrations import transformers as dsa_hf
    reg = dsa_hf.register("agree_wrapper", mode="qk", keep_rate=0.7, backend="torch")
    return dsa_hf.parallelize(_llama(reg, seed), group)


def _one_rank_case(name, rank, seed):
    import torch.distributed as dist
    n = 7
    gen = torch.Generator().manual_seed(seed + rank)
    idx = torch.randint(0, VOCAB, (2, n), generator=gen)
    tgt = torch.randint(0, VOCAB, (2, n), generator=gen)
    kw, fails = {}, {}
    if name == "hf_empty_shard":
        from dist_sparse_attn.integrations import transformers as dsa_hf
        reg = dsa_hf.register("agree_empty", mode="qk", keep_rate=0.5, group=dist.group.WORLD,
                              backend="torch")
        wrapper = _llama(reg, seed)
        n = 11 if rank == 0 else 0
        ids = torch.randint(0, VOCAB, (1, n), generator=gen)
        # (transformers' own layers fail on an empty shard before any attention function
        # runs: the wrapper checks the shard lengths first)
        dsa_hf.parallelize(wrapper, dist.group.WORLD)
        with pytest.raises(ValueError, match=r"shard lengths \[11, 0\]"):
            wrapper(ids)
        return
    if name == "ulysses_q_keep":
        from dist_sparse_attn.integrations.deepspeed import ulysses_sparse_attention
        attn = ulysses_sparse_attention(dist.group.WORLD, "qk", backend="torch")
        q = torch.randn(1, n, 4, 8, generator=gen)
        k, v = (torch.randn(1, n, 2, 8, generator=gen) for _ in range(2))
        q_keep = torch.ones(1, WORLD * n, 2, dtype=torch.bool)
        k_keep = torch.ones(1, WORLD * n, 1, dtype=torch.bool)
        if rank == 1:
            q_keep = torch.ones(1, WORLD * n + 1, 2, dtype=torch.bool)
        with pytest.raises(ValueError, match="q_keep" if rank == 1 else _ON_1):
            attn(q, k, v, 0, None, q_keep=q_keep, k_keep=k_keep)
        return
    model = _gpt(seed) if name.startswith("gpt") else _hf_wrapper(seed, dist.group.WORLD)
    what = name.split("_", 1)[1]
    if rank == 1:
        if what == "targets_shape":
            tgt, fails = tgt[:, :-1], "targets"
        elif what == "idx_vocab":
            idx, fails = idx.clone().fill_(VOCAB), "idx"
        else:
            kw["positions"], fails = torch.arange(n + 1), "positions"
    with pytest.raises(ValueError, match=fails if rank == 1 else _ON_1):
        model(idx, tgt, **kw)


def _dense_case(name, rank, seed):
    import torch.distributed as dist

    from dist_sparse_attn.integrations.deepspeed import UlyssesDenseAttention
    gen = torch.Generator().manual_seed(seed + rank)
    n, hkv = ((5, 2) if rank == 0 else (7, 2)) if name == "dense_uneven_shards" else (6, 1)
    q = torch.randn(1, n, 4, 8, generator=gen)
    k, v = (torch.randn(1, n, hkv, 8, generator=gen) for _ in range(2))
    match = r"shard length|N/P" if name == "dense_uneven_shards" else "Hkv|kv heads"
    with pytest.raises(ValueError, match=match):
        UlyssesDenseAttention(dist.group.WORLD)(q, k, v)


def _still_in_step(rank, seed):
    """Valid calls on every rank: the sharded GPT, HF wrapper and dense Ulysses equal one
    process on the whole sequence."""
    import torch.distributed as dist

    from dist_sparse_attn.integrations.deepspeed import UlyssesDenseAttention
    from dist_sparse_attn.integrations.transformers import parallelize as hf_parallelize
    from dist_sparse_attn.model import parallelize
    from dist_sparse_attn.modules import dense_causal_sdpa
    gen = torch.Generator().manual_seed(seed)
    n = 6
    idx, tgt = (torch.randint(0, VOCAB, (2, WORLD * n), generator=gen) for _ in range(2))
    lo, hi = rank * n, (rank + 1) * n
    for model, par in ((_gpt_one(seed), parallelize), (_hf_wrapper(seed, None), hf_parallelize)):
        want, _ = model(idx)
        got, loss = par(model, dist.group.WORLD)(idx[:, lo:hi], tgt[:, lo:hi])
        torch.testing.assert_close(got, want[:, lo:hi], rtol=1e-4, atol=1e-5)
        assert torch.isfinite(loss)
    q = torch.randn(1, WORLD * n, 4, 8, generator=gen)
    k, v = (torch.randn(1, WORLD * n, 2, 8, generator=gen) for _ in range(2))
    got = UlyssesDenseAttention(dist.group.WORLD)(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi])
    torch.testing.assert_close(got, dense_causal_sdpa(q, k, v, "math")[:, lo:hi],
                               rtol=1e-4, atol=1e-5)


def _gpt_one(seed):
    from dist_sparse_attn.model import GPT, GPTConfig
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=1, n_head=4, n_kv_head=2, n_embd=32, vocab_size=VOCAB,
                         attention="hash", n_buckets=4))


def _check(name, rank, seed):
    if name in HF_OPTIONS:
        _hf_options_case(name, rank, seed)
    elif name in ONE_RANK:
        _one_rank_case(name, rank, seed)
    elif name in DENSE:
        _dense_case(name, rank, seed)
    else:
        _still_in_step(rank, seed)


def _worker(rank, world, port, seed, outdir):
    import logging

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_SIZE=str(world))
    torch.set_num_threads(1)
    import deepspeed
    deepspeed.utils.logger.setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False,
                               timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    record_cases(CASES, lambda i, name: _check(name, rank, seed + 7 * i), rank, outdir)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_workers(_worker, WORLD, tmp_path_factory.mktemp("agreement"), CASES,
                       JOIN_TIMEOUT_S, extra_args=(base_seed(),))


@pytest.mark.timeout(JOIN_TIMEOUT_S + 60)
@pytest.mark.parametrize("case", CASES)
def test_ranks_agree(results, case):
    assert_ranks_ok(results, WORLD, case)


def test_register_refuses_every_transformers_name():
    """Every implementation transformers ships (its AttentionInterface's and the names
    attn_implementation accepts) is refused: registering it would replace it
    process-wide."""
    from transformers import AttentionInterface

    from dist_sparse_attn.integrations import transformers as dsa_hf
    names = set(AttentionInterface._global_mapping) | {
        "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention",
        "paged|sdpa", "paged|eager", "paged|flash_attention_2", "kernels-community/flash-attn"}
    for name in sorted(names):
        with pytest.raises(ValueError, match="name"):
            dsa_hf.register(name, mode="qk")
