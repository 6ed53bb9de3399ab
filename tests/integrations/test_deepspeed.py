"""DeepSpeed integration (:mod:`dist_sparse_attn.integrations.deepspeed`) on CPU with gloo.

One 2-process run (``helpers.run_workers``) does every distributed case in turn,
after one ``deepspeed.init_distributed`` (its small C++ extension is built on the
first use in an environment, ~35 s; cached afterwards):

* "auto_without_group": before ``deepspeed.initialize`` there is no
  sequence-parallel group: the "auto" modules run local attention.
* "ulysses_hash_gqa" / "ulysses_qk" / "ulysses_errors": ``ulysses_sparse_attention``
  (DeepSpeed's ``DistributedAttention`` over ``UlyssesLocalSparseAttention``) on an
  explicit group: output and q/k/v gradient shards equal ``hash_sparse_attention`` /
  ``qk_sparse_attention`` on the whole sequence (float64); bad head counts and
  ``batch_dim_idx`` raise ValueError on every rank.
* "gpt_ds_ulysses": the GPT of :mod:`dist_sparse_attn.model` parallelized with strategy
  "ds-ulysses" (``UlyssesDenseAttention``: DeepSpeed's ``DistributedAttention`` over
  dense SDPA, the benchmarks' dense baseline): the shards' logits and the summed
  parameter gradients equal the one-process model on the whole sequence (float64).
* "zero0" .. "zero3": a tiny model (Linear -> q, k, v -> DeepSpeedSparseAttention ->
  Linear) in ``deepspeed.initialize`` with ``"sequence_parallel_size": 2,
  "data_parallel_size": 1`` and ZeRO stage 0..3 (fp32, SGD), each rank feeding its
  contiguous (uneven) shard: the module found DeepSpeed's group by itself, the
  output shards and the input-gradient shards equal the same model with local
  attention on the whole sequence, and one ``engine.backward`` / ``engine.step`` runs.
  (Parameter gradients are DeepSpeed's business, not compared: with this config
  DeepSpeed 0.19.8 reduces them over the size-1 "data_parallel" mesh dimension
  only, so under ZeRO 0-2 each rank keeps 2x its own contribution and the ranks'
  parameters drift apart after a step; ZeRO-3 steps with the mean of the two
  ranks' contributions, as measured with DeepSpeed 0.19.8.)
* "ulysses_auto_after_initialize": "auto" then resolves to DeepSpeed's group.

The other tests run in the pytest process without torch.distributed.
"""
from __future__ import annotations

import datetime
import os
import subprocess
import sys

import pytest
import torch

from helpers import REPO, assert_ranks_ok, base_seed, record_cases, run_workers

pytest.importorskip("deepspeed")

WORLD = 2
JOIN_TIMEOUT_S = 200
PG_TIMEOUT_S = 120     # the first init_distributed in an environment builds a C++ extension
CASES = ["auto_without_group", "ulysses_hash_gqa", "ulysses_qk", "ulysses_errors",
         "gpt_ds_ulysses", "zero0", "zero1", "zero2", "zero3", "ulysses_auto_after_initialize"]
# ZeRO stage -> (mode, strategy) of the model's attention
ZERO_MODES = {0: ("hash", None), 1: ("qk", None), 2: ("bucketed", None), 3: ("hash", "ulysses")}
F64 = dict(rtol=1e-9, atol=1e-12)
F32 = dict(rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# worker side
# ---------------------------------------------------------------------------------------------

def _ulysses_case(name, rank, group, seed):
    """Ulysses: the rank's sequence shard in, its output shard and q/k/v gradient shards
    out, against the single-device op on the whole sequence and all heads."""
    from deepspeed.sequence.layer import DistributedAttention
    from helpers import assert_close_rel

    from dist_sparse_attn import hash_sparse_attention, qk_sparse_attention
    from dist_sparse_attn.integrations.deepspeed import ulysses_sparse_attention

    B, n, H, Hkv, D, nb = 2, 12, 4, 2, 8, 4
    N = WORLD * n
    gen = torch.Generator().manual_seed(seed)
    q, k, v, g = (torch.randn(B, N, h, D, generator=gen, dtype=torch.float64)
                  for h in (H, Hkv, Hkv, H))
    lo, hi = rank * n, (rank + 1) * n
    h_lo, kv_lo = rank * H // WORLD, rank * Hkv // WORLD          # this rank's first heads
    full = [x.clone().requires_grad_(True) for x in (q, k, v)]
    shard = [x[:, lo:hi].clone().requires_grad_(True) for x in (q, k, v)]
    if name == "qk":
        q_keep = torch.rand(B, N, H, generator=gen) < 0.6
        k_keep = torch.rand(B, N, Hkv, generator=gen) < 0.6
        o_ref = qk_sparse_attention(*full, q_keep, k_keep, backend="torch")
        attn = ulysses_sparse_attention(group, "qk", backend="torch")
        o = attn(*shard, 0, q_keep=q_keep[:, :, h_lo:h_lo + H // WORLD],
                 k_keep=k_keep[:, :, kv_lo:kv_lo + Hkv // WORLD])
    else:
        o_ref = hash_sparse_attention(*full, nb, seed=11, backend="torch")
        attn = ulysses_sparse_attention(group, "hash", nb, seed=11, backend="torch")
        o = attn(*shard, batch_dim_idx=0)
    assert isinstance(attn, DistributedAttention)
    ref = (o_ref, *torch.autograd.grad(o_ref, full, g))
    got = (o, *torch.autograd.grad(o, shard, g[:, lo:hi]))
    for nm, x, y in zip(("o", "dq", "dk", "dv"), got, ref):
        assert_close_rel(x, y[:, lo:hi].detach(), name=nm, **F64)


def _gpt_ds_ulysses_case(rank, seed):
    import torch.distributed as dist
    from helpers import assert_close_rel

    from dist_sparse_attn.integrations.deepspeed import (UlyssesDenseAttention,
                                                         ulysses_dense_attention)
    from dist_sparse_attn.model import GPT, GPTConfig, parallelize
    cfg = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, attention="dense")
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**cfg)).double()
    gen = torch.Generator().manual_seed(seed)
    N, n = 2 * 15, 15
    idx, tgt = (torch.randint(0, 256, (2, N), generator=gen) for _ in range(2))
    full_logits, full_loss = model(idx, tgt)
    full_loss.backward()
    full_grads = {nm: p.grad.clone() for nm, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="dense baseline"):
        parallelize(GPT(GPTConfig(**{**cfg, "attention": "hash"})), dist.group.WORLD,
                    ulysses_dense_attention)
    parallelize(model, dist.group.WORLD, ulysses_dense_attention)
    assert all(isinstance(b.attn.core_attn, UlyssesDenseAttention) for b in model.transformer.h)
    lo, hi = rank * n, (rank + 1) * n
    logits, loss = model(idx[:, lo:hi], tgt[:, lo:hi])     # offset found by the model
    assert_close_rel(logits, full_logits[:, lo:hi].detach(), name="logits", **F64)
    (loss * n / N).backward()
    for nm, p in model.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g)
        assert_close_rel(g, full_grads[nm], name=f"grad {nm}", **F64)


def _make_model(mode, strategy, sequence_parallel):
    from dist_sparse_attn.integrations.deepspeed import DeepSpeedSparseAttention

    class Tiny(torch.nn.Module):
        """Linear -> q (4 heads), k, v (2 heads), head dim 4 -> attention -> Linear."""

        def __init__(self):
            super().__init__()
            self.inp = torch.nn.Linear(16, 32)
            self.attn = DeepSpeedSparseAttention(
                mode, 4 if mode == "hash" else None, strategy=strategy, seed=3,
                sequence_parallel=sequence_parallel, backend="torch")
            self.out = torch.nn.Linear(16, 16)

        def forward(self, x):
            B, n, _ = x.shape
            h = self.inp(x)
            q, k, v = h[..., :16].view(B, n, 4, 4), h[..., 16:24].view(B, n, 2, 4), \
                h[..., 24:].view(B, n, 2, 4)
            if mode == "qk":        # per-token rules: a shard computes what the whole does
                o = self.attn(q, k, v, q[..., 0] > -0.3, k[..., 0] > -0.3)
            elif mode == "bucketed":
                o = self.attn(q, k, v, q_buckets=(q[..., 1] > 0).long(),
                              k_buckets=(k[..., 1] > 0).long())
            else:
                o = self.attn(q, k, v)
            return self.out(o.reshape(B, n, 16))

    return Tiny()


def _zero_case(stage, rank, seed):
    import warnings

    import deepspeed
    import torch.distributed as dist
    from helpers import assert_close_rel

    import dist_sparse_attn.integrations.deepspeed as ds_mod
    from dist_sparse_attn.integrations.deepspeed import deepspeed_sequence_parallel_group

    mode, strategy = ZERO_MODES[stage]
    torch.manual_seed(seed)
    model = _make_model(mode, strategy, "auto")
    oracle = _make_model(mode, strategy, None)          # local attention, whole sequence
    oracle.load_state_dict(model.state_dict())          # before ZeRO-3 partitions model
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "sequence_parallel_size": WORLD, "data_parallel_size": 1,
              "optimizer": {"type": "SGD", "params": {"lr": 0.01}},
              "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": stage}}
    engine, *_ = deepspeed.initialize(model=model, config=config,
                                      model_parameters=model.parameters())
    group = engine.seq_parallel_group
    assert dist.get_world_size(group) == WORLD
    assert deepspeed_sequence_parallel_group() is group
    assert deepspeed_sequence_parallel_group(engine) is group
    assert engine.module.attn.process_group() is group        # "auto" found it

    gen = torch.Generator().manual_seed(seed)
    lengths = [11, 13]
    lo, hi = sum(lengths[:rank]), sum(lengths[:rank + 1])
    x = torch.randn(1, sum(lengths), 16, generator=gen)
    w = torch.randn(1, sum(lengths), 16, generator=gen)
    xs = x[:, lo:hi].clone().requires_grad_(True)
    ds_mod._MESH_WARNED = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = engine(xs)
    # the config mesh (no mpu) does not reduce parameter gradients across SP ranks
    assert any(issubclass(c.category, RuntimeWarning) and "SequenceParallelMPU" in str(c.message)
               for c in caught), [str(c.message) for c in caught]
    engine.backward((y * w[:, lo:hi]).sum())
    xf = x.clone().requires_grad_(True)
    y_ref = oracle(xf)
    (y_ref * w).sum().backward()
    assert_close_rel(y, y_ref[:, lo:hi].detach(), name=f"output (ZeRO-{stage}, {mode})", **F32)
    assert_close_rel(xs.grad, xf.grad[:, lo:hi], name=f"d input (ZeRO-{stage}, {mode})", **F32)
    engine.step()
    y2 = engine(xs.detach())
    assert torch.isfinite(y2).all()


def _check(name, rank, seed):
    import deepspeed
    import torch.distributed as dist

    from dist_sparse_attn import SparseAttention
    from dist_sparse_attn.integrations.deepspeed import (DeepSpeedSparseAttention,
                                                         deepspeed_sequence_parallel_group,
                                                         ulysses_sparse_attention)
    if name == "auto_without_group":
        assert deepspeed_sequence_parallel_group() is None
        gen = torch.Generator().manual_seed(seed + rank)
        q = torch.randn(1, 9, 4, 8, generator=gen)
        k, v = (torch.randn(1, 9, 2, 8, generator=gen) for _ in range(2))
        want = SparseAttention("hash", 4, backend="torch")(q, k, v)
        assert torch.equal(DeepSpeedSparseAttention("hash", 4, backend="torch")(q, k, v), want)
        assert torch.equal(ulysses_sparse_attention("auto", "hash", 4, backend="torch")(q, k, v),
                           want)
        # an explicit group still works without DeepSpeed's
        mod = DeepSpeedSparseAttention("hash", 4, sequence_parallel=dist.group.WORLD,
                                       backend="torch")
        assert mod.process_group() is dist.group.WORLD
    elif name in ("ulysses_hash_gqa", "ulysses_qk"):
        _ulysses_case(name.split("_")[1], rank, dist.new_group(list(range(WORLD))), seed)
    elif name == "ulysses_errors":
        attn = ulysses_sparse_attention(dist.group.WORLD, "hash", 4, backend="torch")
        q = torch.randn(1, 6, 4, 8)
        kv1 = torch.randn(1, 6, 1, 8)           # 1 kv head on 2 ranks: uneven
        with pytest.raises(ValueError, match="divisible"):
            attn(q, kv1, kv1, 0)
        with pytest.raises(ValueError, match="divisible"):
            attn(q[:, :, :3], kv1, kv1, 0)
        kv = torch.randn(1, 6, 2, 8)
        with pytest.raises(ValueError, match="batch_dim_idx"):
            attn(q, kv, kv, 1)
        # an error on rank 1 only: rank 0 must not enter the head exchange alone
        with pytest.raises(ValueError, match="divisible" if rank == 1 else "rank"):
            attn(q[:, :, :3] if rank == 1 else q, kv, kv, 0)
        # settings that differ between ranks: every rank raises, naming the setting
        # (unchecked, each rank would hash or scale its heads its own way: a wrong result)
        for name, kw in (("seed", dict(seed=rank)), ("n_buckets", dict(n_buckets=4 + 2 * rank)),
                         ("softmax_scale", dict(softmax_scale=0.1 + rank)),
                         ("include_self", dict(include_self=rank == 0))):
            opts = dict(n_buckets=4, backend="torch")
            opts.update(kw)
            nb = opts.pop("n_buckets")
            other = ulysses_sparse_attention(dist.group.WORLD, "hash", nb, **opts)
            with pytest.raises(ValueError, match=f"{name} differs between ranks"):
                other(q, kv, kv, 0)
        with pytest.raises(ValueError, match="mode differs between ranks"):
            ulysses_sparse_attention(dist.group.WORLD, "hash" if rank else "dense",
                                     4 if rank else None, backend="torch")(q, kv, kv, 0)
        with pytest.raises(ValueError, match="N/P differs between ranks"):
            attn(q[:, :5 + rank], kv[:, :5 + rank], kv[:, :5 + rank], 0)
        assert attn(q, kv, kv, 0).shape == q.shape      # the group is still in step
    elif name == "gpt_ds_ulysses":
        _gpt_ds_ulysses_case(rank, seed)
    elif name.startswith("zero"):
        _zero_case(int(name[-1]), rank, seed)
    elif name == "ulysses_auto_after_initialize":
        assert deepspeed_sequence_parallel_group() is not None
        _ulysses_case("hash", rank, "auto", seed)
    else:
        raise AssertionError(f"unknown case {name}")
    assert deepspeed.comm.is_initialized()


def _worker(rank, world, port, seed, outdir):
    import logging

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_SIZE=str(world))
    import deepspeed
    deepspeed.utils.logger.setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False,
                               timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    record_cases(CASES, lambda i, name: _check(name, rank, seed + 101 * i), rank, outdir)


# ---------------------------------------------------------------------------------------------
# test side
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_workers(_worker, WORLD, tmp_path_factory.mktemp("deepspeed"), CASES,
                       JOIN_TIMEOUT_S, extra_args=(base_seed(),))


@pytest.mark.timeout(JOIN_TIMEOUT_S + 60)
@pytest.mark.parametrize("case", CASES)
def test_deepspeed_distributed(results, case):
    assert_ranks_ok(results, WORLD, case)


@pytest.mark.timeout(60)
def test_local_when_no_group():
    """sequence_parallel=None (and "auto" without torch.distributed) is SparseAttention."""
    from dist_sparse_attn import SparseAttention
    from dist_sparse_attn.integrations.deepspeed import (DeepSpeedSparseAttention,
                                                         UlyssesLocalSparseAttention,
                                                         deepspeed_sequence_parallel_group)

    class NoGroupEngine:
        seq_parallel_group = None

    assert deepspeed_sequence_parallel_group() is None
    assert deepspeed_sequence_parallel_group(NoGroupEngine()) is None
    q = torch.randn(2, 17, 4, 8, requires_grad=True)
    k, v = (torch.randn(2, 17, 2, 8, requires_grad=True) for _ in range(2))
    for sp in (None, "auto"):
        mod = DeepSpeedSparseAttention("hash", 4, seed=2, sequence_parallel=sp, backend="torch")
        assert mod.process_group() is None
        assert torch.equal(mod(q, k, v), SparseAttention("hash", 4, seed=2, backend="torch")(q, k, v))
        keep_q, keep_k = torch.rand(2, 17, 4) < 0.5, torch.rand(2, 17, 2) < 0.5
        mod = DeepSpeedSparseAttention("qk", sequence_parallel=sp, backend="torch")
        assert torch.equal(mod(q, k, v, keep_q, keep_k),
                           SparseAttention("qk", backend="torch")(q, k, v, keep_q, keep_k))
    # one rank of Ulysses: all heads, the rotations of lsh_buckets
    local = UlyssesLocalSparseAttention(None, "hash", 4, seed=2, backend="torch")
    assert torch.equal(local(q, k, v), SparseAttention("hash", 4, seed=2, backend="torch")(q, k, v))


@pytest.mark.timeout(60)
def test_ulysses_buckets_use_global_head_rotations():
    """Rank r's buckets are the columns of lsh_buckets over all heads for its heads."""
    from dist_sparse_attn import lsh_buckets
    from dist_sparse_attn.integrations.deepspeed import ulysses_lsh_buckets

    for (H, Hkv, P), nb in zip(((8, 4, 2), (4, 4, 4), (6, 2, 2), (8, 4, 2), (4, 2, 2)),
                               (8, 8, 8, 2048, 134)):
        q, k = torch.randn(2, 30, H, 16), torch.randn(2, 30, Hkv, 16)
        qb = lsh_buckets(q, nb, seed=5, group_size=H // Hkv)
        kb = lsh_buckets(k, nb, seed=5)
        h, hk = H // P, Hkv // P
        for r in range(P):
            a, b = ulysses_lsh_buckets(q[:, :, r * h:(r + 1) * h], k[:, :, r * hk:(r + 1) * hk],
                                       nb, seed=5, rank=r, world=P)
            assert torch.equal(a, qb[:, :, r * h:(r + 1) * h])
            assert torch.equal(b, kb[:, :, r * hk:(r + 1) * hk])


@pytest.mark.timeout(60)
def test_bad_arguments_raise_value_error():
    from dist_sparse_attn.integrations.deepspeed import (DeepSpeedSparseAttention,
                                                         UlyssesLocalSparseAttention,
                                                         ulysses_lsh_buckets,
                                                         ulysses_sparse_attention)
    bad = [
        (lambda: DeepSpeedSparseAttention("hash", 4, sequence_parallel="yes"), "sequence_parallel"),
        (lambda: DeepSpeedSparseAttention("hash", 4, sequence_parallel=2), "sequence_parallel"),
        (lambda: DeepSpeedSparseAttention("sparse"), "mode"),
        (lambda: DeepSpeedSparseAttention("hash", 3), "n_buckets"),
        (lambda: DeepSpeedSparseAttention("qk", 4), "n_buckets"),
        (lambda: DeepSpeedSparseAttention("hash", 4, strategy="ring"), "strategy"),
        (lambda: DeepSpeedSparseAttention("dense", backend="cuda"), "backend"),
        (lambda: UlyssesLocalSparseAttention("world", "hash", 4), "group"),
        (lambda: UlyssesLocalSparseAttention(None, "hash", None), "n_buckets"),
        (lambda: ulysses_sparse_attention(None, "qk", softmax_scale=float("nan")), "softmax_scale"),
    ]
    for fn, match in bad:
        with pytest.raises(ValueError, match=match):
            fn()
    q, k = torch.randn(1, 5, 4, 8), torch.randn(1, 5, 2, 8)
    with pytest.raises(ValueError, match="q_keep"):
        DeepSpeedSparseAttention("hash", 4, sequence_parallel=None)(q, k, k, q[..., 0] > 0)
    with pytest.raises(ValueError, match="q_keep"):
        UlyssesLocalSparseAttention(None, "hash", 4)(q, k, k, q_keep=q[..., 0] > 0)
    with pytest.raises(ValueError, match="k_keep"):
        UlyssesLocalSparseAttention(None, "qk")(q, k, k, q_keep=q[..., 0] > 0)
    with pytest.raises(ValueError, match="rank"):
        ulysses_lsh_buckets(q, k, 4, rank=2, world=2)
    with pytest.raises(ValueError, match="world"):
        ulysses_lsh_buckets(q, k, 4, rank=0, world=0)
    with pytest.raises(ValueError, match="k/v heads"):
        ulysses_lsh_buckets(q, k[:, :, :1].expand(1, 5, 3, 8), 4)
    with pytest.raises(ValueError, match="seed"):
        ulysses_lsh_buckets(q, k, 4, seed="abc")
    with pytest.raises(ValueError, match="n_buckets"):
        ulysses_lsh_buckets(q, k, 2 ** 40)


@pytest.mark.timeout(120)
def test_imports_without_deepspeed():
    """The integration package imports, and local attention runs, without importing DeepSpeed."""
    code = ("import sys, torch\n"
            "import dist_sparse_attn.integrations as i\n"
            "q = torch.randn(1, 6, 2, 8)\n"
            "i.DeepSpeedSparseAttention('dense')(q, q, q)\n"
            "assert 'deepspeed' not in sys.modules, 'deepspeed was imported'\n")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=110)
    assert res.returncode == 0, res.stderr[-3000:]
