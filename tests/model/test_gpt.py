"""The GPT of dist_sparse_attn.model: shapes, gradients, RoPE, qk/dense agreement,
activation checkpointing, optimizer groups, training on the embedded corpus, and the
sequence-parallel path on 2 gloo processes (shard logits == full-sequence logits).
References: the same model computed another way (dense vs qk with every token kept,
unchunked vs chunked, one process vs shards), the library's ops on buckets built here,
and direct counts."""
from __future__ import annotations

import datetime
import os
import traceback

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from dist_sparse_attn.data import (TokenData, eval_retrieval, retrieval_batch, shard_sequence,
                                   stdlib_corpus)
from dist_sparse_attn.hashing import position_keep
from dist_sparse_attn.model import GPT, GPTConfig, parallelize
from helpers import REPO, assert_ranks_ok, base_seed, run_workers

TINY = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, n_buckets=4)


def _pair(a: str, b: str, **kw):
    """Two models with the same weights and different attention."""
    ma = GPT(GPTConfig(attention=a, **{**TINY, **kw}))
    mb = GPT(GPTConfig(attention=b, **{**TINY, **kw}))
    mb.load_state_dict(ma.state_dict())
    return ma, mb


@pytest.mark.parametrize("attention", ["dense", "hash", "qk"])
@pytest.mark.parametrize("n_kv_head", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_forward_shapes_finite_loss_and_grads(attention, n_kv_head):
    model = GPT(GPTConfig(attention=attention, **{**TINY, "n_kv_head": n_kv_head}))
    idx = torch.randint(0, 256, (2, 63))
    logits, loss = model(idx, idx.roll(-1, 1))
    assert logits.shape == (2, 63, 256)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.5   # near-uniform init
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.transformer.h[0].attn.c_attn.weight.grad.abs().sum() > 0
    assert model(idx)[1] is None


def test_qk_keep_all_equals_dense():
    dense, qk = _pair("dense", "qk", qk_keep_rate=1.0)
    idx = torch.randint(0, 256, (2, 70))
    torch.testing.assert_close(qk(idx)[0], dense(idx)[0], rtol=1e-4, atol=1e-5)


def test_hash_differs_from_dense_and_is_deterministic():
    dense, hashed = _pair("dense", "hash")
    idx = torch.randint(0, 256, (2, 64))
    a, b = hashed(idx)[0], hashed(idx)[0]
    assert torch.equal(a, b)
    assert not torch.allclose(a, dense(idx)[0], atol=1e-5)


def test_causal_prefix_invariance():
    """Logits of a prefix do not depend on the tokens after it (dense and hash)."""
    for attention in ("dense", "hash"):
        model = GPT(GPTConfig(attention=attention, **TINY))
        idx = torch.randint(0, 256, (1, 50))
        other = torch.cat([idx[:, :30], torch.randint(0, 256, (1, 20))], 1)
        torch.testing.assert_close(model(idx)[0][:, :30], model(other)[0][:, :30],
                                   rtol=1e-4, atol=1e-5)


def test_rope_is_relative():
    """Shifting every position by the same offset leaves dense logits unchanged (hash
    buckets are taken after RoPE, so they depend on absolute positions), and explicit
    positions arange(N) equal the default."""
    for attention in ("dense",):
        model = GPT(GPTConfig(attention=attention, **TINY))
        idx = torch.randint(0, 256, (2, 40))
        base = model(idx)[0]
        torch.testing.assert_close(model(idx, positions=torch.arange(40))[0], base)
        torch.testing.assert_close(model(idx, positions=torch.arange(40) + 1000)[0], base,
                                   rtol=1e-3, atol=1e-4)
        # (B, N) positions
        torch.testing.assert_close(model(idx, positions=torch.arange(40).expand(2, 40))[0],
                                   base)
        # but a permutation of positions changes them (positions are used)
        assert not torch.allclose(model(idx, positions=torch.arange(40).flip(0) * 3)[0], base,
                                  atol=1e-4)


def test_position_keep_rule():
    B, N, H = 2, 400, 3
    pos = torch.arange(N)
    keep = position_keep(pos, B, H, 0.25, seed=3, salt=0)
    assert keep.shape == (B, N, H) and keep[:, 0].all()
    assert torch.equal(keep[0], keep[1])                 # depends on positions only
    # evenly spread: every window of 40 tokens keeps 10 of them, up to 2
    for a in range(1, N - 40, 37):
        counts = keep[0, a:a + 40].sum(0)
        assert ((counts - 10).abs() <= 2).all(), counts
    # causal and local: a shard with global positions decides like the full sequence
    assert torch.equal(position_keep(pos[150:], B, H, 0.25, 3, 0), keep[:, 150:])
    # other salt / seed / head: other choices; rate 1.0 keeps everything
    assert not torch.equal(position_keep(pos, B, H, 0.25, 3, 1), keep)
    assert not torch.equal(position_keep(pos, B, H, 0.25, 4, 0), keep)
    assert not torch.equal(keep[..., 0], keep[..., 1])
    assert position_keep(pos, B, H, 1.0, 3, 0).all()
    # explicit (B, N) positions; no position 0: nothing forced
    kb = position_keep(pos.expand(B, N) + 5, B, H, 0.25, 3, 0)
    assert torch.equal(kb, position_keep(pos + 5, B, H, 0.25, 3, 0))


def _next_byte_grads(models, idx):
    """Each model's parameter gradients of its next-byte loss on idx."""
    grads = []
    for m in models:
        m(idx, idx.roll(-1, 1))[1].backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    return grads


def test_activation_checkpointing_same_logits_and_grads():
    plain, ckpt = _pair("hash", "hash")
    ckpt.config.activation_checkpointing = True
    idx = torch.randint(0, 256, (2, 48))
    grads = _next_byte_grads((plain, ckpt), idx)
    torch.testing.assert_close(ckpt(idx)[0], plain(idx)[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "block_ckpt"])
def test_mlp_chunk_same_logits_and_grads(ckpt):
    """mlp_chunk (chunks of 16 over 50 tokens: the last one short) computes the same
    function and gradients, alone and inside the blocks' activation checkpoints."""
    plain = GPT(GPTConfig(attention="hash", **TINY)).double()
    chunked = GPT(GPTConfig(attention="hash", mlp_chunk=16, activation_checkpointing=ckpt,
                            **TINY)).double()
    chunked.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 256, (2, 50))
    grads = _next_byte_grads((plain, chunked), idx)
    with torch.no_grad():       # the no-grad path (eval) chunks too
        torch.testing.assert_close(chunked(idx)[0], plain(idx)[0], rtol=1e-12, atol=1e-12)
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-10, atol=1e-12)


def _largest_tensor_made(fn):
    """The largest numel among the outputs of every aten op that fn runs."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    Largest.numel = max(Largest.numel, t.numel())
            return out

    with Largest():
        fn()
    return Largest.numel


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "block_ckpt"])
def test_mlp_chunk_never_materialises_the_whole_hidden(ckpt, seed):
    """Forward and backward of the MLP over N tokens: unchunked, some op makes an
    N x 4C tensor (the hidden activation or its gradient); with mlp_chunk no tensor is
    larger than N x C (the input, the output, their gradients)."""
    from dist_sparse_attn.model import MLP
    N, C = 256, 8
    cfg = dict(n_embd=C, n_head=2)
    for chunk, bound in ((0, 4 * N * C), (32, N * C)):
        torch.manual_seed(seed)
        mlp = MLP(GPTConfig(mlp_chunk=chunk, **cfg))
        x = torch.randn(1, N, C, requires_grad=True)

        def step():
            y = checkpoint(mlp, x, use_reentrant=False) if ckpt else mlp(x)
            y.square().sum().backward()

        largest = _largest_tensor_made(step)
        if chunk:
            assert largest <= bound, (chunk, largest)
        else:
            assert largest == bound, largest
        if not ckpt:
            # what autograd keeps for backward: the hidden (2 x N x 4C: c_fc and GELU
            # outputs) unchunked; with chunks at most the input's N x C elements
            saved = []
            with torch.autograd.graph.saved_tensors_hooks(
                    lambda t: saved.append(t.numel()) or t, lambda t: t):
                mlp(x)
            kept = sum(saved)
            assert (kept <= N * C) if chunk else (kept >= 2 * 4 * N * C), (chunk, kept)


def test_attention_none_mixes_no_tokens():
    """attention="none" (the benchmarks' attention-free floor): a token's logits depend on
    that token only, and the model still trains (finite gradients into every block)."""
    model = GPT(GPTConfig(attention="none", **TINY))
    idx = torch.randint(0, 256, (2, 20))
    other = idx.clone()
    other[:, ::2] = torch.randint(0, 256, (2, 10))
    a, b = model(idx)[0], model(other)[0]
    same = (idx == other)
    torch.testing.assert_close(a[same], b[same])
    assert not torch.allclose(a[~same], b[~same])
    model(idx, idx.roll(-1, 1))[1].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in model.parameters())


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "block_ckpt"])
def test_loss_chunk_same_loss_and_grads(ckpt):
    """loss_chunk (chunks of 16 over 50 tokens, some targets ignored) gives the same mean
    loss and gradients as the whole-sequence head, and returns no logits."""
    plain = GPT(GPTConfig(attention="hash", **TINY)).double()
    chunked = GPT(GPTConfig(attention="hash", loss_chunk=16, activation_checkpointing=ckpt,
                            **TINY)).double()
    chunked.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 256, (2, 50))
    tgt = idx.roll(-1, 1)
    tgt[:, -3:] = -1
    losses = []
    for m in (plain, chunked):
        logits, loss = m(idx, tgt)
        loss.backward()
        losses.append(loss)
    assert logits is None
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-12, atol=0)
    for (n, p), q in zip(plain.named_parameters(), chunked.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=n)
    with torch.no_grad():
        torch.testing.assert_close(chunked(idx, tgt)[1], losses[0].detach(), rtol=1e-12,
                                   atol=0)


@pytest.mark.parametrize("chunk", [0, 8], ids=["whole", "loss_chunk"])
def test_integer_dtypes_of_idx_and_targets(chunk):
    """Any integer dtype the input check accepts gives the int64 result: int32 targets
    (and int16 / uint8 ids, which the embedding refuses) used to raise a RuntimeError
    deep inside the loss or the embedding."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(attention="hash", loss_chunk=chunk, **TINY)).double()
    idx = torch.randint(0, 256, (2, 20))
    tgt = idx.roll(-1, 1)
    tgt[:, -2:] = -1
    want = model(idx, tgt)
    for dt in (torch.int32, torch.int16, torch.uint8):
        t = tgt.clamp(min=0) if dt == torch.uint8 else tgt      # uint8 holds no -1
        w = want if dt != torch.uint8 else model(idx, t)
        logits, loss = model(idx.to(dt), t.to(dt))
        torch.testing.assert_close(loss, w[1], rtol=0, atol=0, msg=str(dt))
        if chunk == 0:
            torch.testing.assert_close(logits, w[0], rtol=0, atol=0, msg=str(dt))


def test_loss_chunk_never_materialises_the_logits(seed):
    """Forward + backward of the loss: unchunked, some op makes the (N, vocab) logits;
    with loss_chunk no tensor reaches that size (attention="none": the attention's own
    tiles stay out of the count; every other tensor is far smaller than N x vocab)."""
    N = 256
    cfg = dict(TINY, n_layer=1)
    for chunk in (0, 32):
        torch.manual_seed(seed)
        model = GPT(GPTConfig(attention="none", loss_chunk=chunk, **cfg))
        idx = torch.randint(0, 256, (1, N))
        largest = _largest_tensor_made(lambda: model(idx, idx.roll(-1, 1))[1].backward())
        if chunk:
            assert largest < N * 256, largest
        else:
            assert largest >= N * 256, largest


def test_offload_checkpoints_moves_block_inputs_and_keeps_grads(monkeypatch):
    """offload_checkpoints: the checkpointed blocks' saved inputs go through the host
    offload hooks (one (B, N, C) block input per layer at least), and the gradients equal
    plain activation checkpointing."""
    plain = GPT(GPTConfig(attention="hash", activation_checkpointing=True, **TINY)).double()
    off = GPT(GPTConfig(attention="hash", activation_checkpointing=True,
                        offload_checkpoints=True, **TINY)).double()
    off.load_state_dict(plain.state_dict())
    packed = []
    real = torch.autograd.graph.save_on_cpu

    def recording(pin_memory=False):
        ctx = real(pin_memory=pin_memory)
        pack = ctx.pack_hook

        def hook(t):
            packed.append(tuple(t.shape))
            return pack(t)
        ctx.pack_hook = hook
        return ctx
    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", recording)
    idx = torch.randint(0, 256, (2, 24))
    grads = _next_byte_grads((plain, off), idx)
    assert packed.count((2, 24, TINY["n_embd"])) >= TINY["n_layer"], packed
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-10, atol=1e-12)


def test_bucket_cap_is_cap_buckets_of_the_lsh_buckets():
    """The model's bucket_cap is exactly bucketed_attention on cap_buckets of its LSH (and
    block-local) buckets, at ceil(bucket_cap * N / n_buckets) keys per bucket."""
    import math

    from dist_sparse_attn import bucketed_attention
    from dist_sparse_attn.balance import cap_buckets
    from dist_sparse_attn.hashing import lsh_buckets
    cfg = GPTConfig(attention="hash", bucket_cap=1.0, local_heads=1, local_window=8,
                    **{**TINY, "n_buckets": 2})
    attn = GPT(cfg).transformer.h[1].attn.core_attn
    assert attn.seed == cfg.hash_seed + 1                     # layer l: hash_seed + l
    B, N, D = 2, 40, TINY["n_embd"] // TINY["n_head"]
    q = torch.randn(B, N, 4, D)
    k, v = torch.randn(B, N, 2, D), torch.randn(B, N, 2, D)
    k = k + 4 * torch.randn(D)      # one direction dominates: the LSH buckets overflow the cap
    # LSH buckets, kv head 1 (and its query heads 2, 3) block-local: position // 8
    qb = lsh_buckets(q, 2, seed=attn.seed, group_size=2)
    kb = lsh_buckets(k, 2, seed=attn.seed)
    qb[..., 2:] = kb[..., 1:] = (torch.arange(N) // 8)[None, :, None]
    want = bucketed_attention(q, k, v, *cap_buckets(qb, kb, math.ceil(N / 2)))
    torch.testing.assert_close(attn(q, k, v), want)
    assert not torch.allclose(want, bucketed_attention(q, k, v, qb, kb))


def test_eval_retrieval_on_gpt(seed):
    """eval_retrieval on the GPT: the fraction of the same sequences whose last position's
    argmax is the planted digit, counted here batch by batch (4, 4, 2) in eval mode; the
    model's training mode is restored."""
    model = GPT(GPTConfig(attention="hash", **TINY))
    model.train()
    acc = eval_retrieval(model, n_samples=10, seq_len=64, batch_size=4,
                         generator=torch.Generator().manual_seed(seed))
    assert model.training
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    correct = 0
    with torch.no_grad():
        for b in (4, 4, 2):
            x, value, _ = retrieval_batch(b, 64, gen)
            correct += int((model(x)[0][:, -1].argmax(-1) == value).sum())
    assert acc == correct / 10, (acc, correct)


def test_configure_optimizers_groups():
    model = GPT(GPTConfig(**{**TINY, "bias": True}))
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.95))
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"])
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == model.get_num_params()          # every parameter once (tied weights too)


def test_config_validation():
    with pytest.raises(ValueError, match="attention"):
        GPTConfig(attention="sparse")
    with pytest.raises(ValueError, match="n_kv_head"):
        GPTConfig(n_head=4, n_kv_head=3)
    with pytest.raises(ValueError, match="n_buckets"):
        GPTConfig(attention="hash", n_buckets=3)
    with pytest.raises(ValueError, match="even head dim"):
        GPTConfig(n_embd=36, n_head=4)
    with pytest.raises(ValueError, match="qk_keep_rate"):
        GPTConfig(qk_keep_rate=0.0)
    with pytest.raises(ValueError, match="local_heads"):
        GPTConfig(attention="hash", n_head=4, n_kv_head=2, local_heads=3)
    with pytest.raises(ValueError, match="local_heads applies"):
        GPTConfig(attention="dense", local_heads=1)
    with pytest.raises(ValueError, match="local_window"):
        GPTConfig(attention="hash", local_heads=1, local_window=0)
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match="mlp_chunk must be"):
            GPTConfig(mlp_chunk=bad)
    with pytest.raises(ValueError, match="needs compile='off'"):
        GPTConfig(mlp_chunk=64, compile="blocks")
    # the Llama's dense attention is transformers' "sdpa", which picks its own backend
    with pytest.raises(ValueError, match="sdpa_backend='cudnn' .* family='hf'"):
        GPTConfig(family="hf", attention="dense", sdpa_backend="cudnn")


def test_local_heads_buckets_and_semantics():
    """Block-local heads: buckets are position // window on the last kv heads (and their
    query heads); a window covering the sequence on every head is dense causal attention;
    the hashed heads keep their LSH buckets."""
    dense = GPT(GPTConfig(attention="dense", **TINY))
    local = GPT(GPTConfig(attention="hash", **{**TINY, "local_heads": TINY["n_kv_head"],
                                               "local_window": 1000}))
    local.load_state_dict(dense.state_dict())
    idx = torch.randint(0, 256, (2, 50))
    torch.testing.assert_close(local(idx)[0], dense(idx)[0], rtol=1e-4, atol=1e-5)

    cfg = GPTConfig(attention="hash", **{**TINY, "local_heads": 1, "local_window": 8})
    attn = GPT(cfg).transformer.h[0].attn.core_attn
    B, N, H, Hkv, D = 2, 40, 4, 2, 8
    q, k = torch.randn(B, N, H, D), torch.randn(B, N, Hkv, D)
    pos = torch.arange(100, 100 + N)
    qb, kb = attn.buckets(q, k, pos)
    win = (pos // 8)[None, :].expand(B, N)
    for h in (2, 3):                      # query heads of kv head 1 (group size 2)
        assert torch.equal(qb[..., h], win)
    assert torch.equal(kb[..., 1], win)
    from dist_sparse_attn.hashing import lsh_buckets
    assert torch.equal(qb[..., :2], lsh_buckets(q, 4, seed=attn.seed, group_size=2)[..., :2])
    assert torch.equal(kb[..., 0], lsh_buckets(k, 4, seed=attn.seed)[..., 0])
    # the counting sort's bucket bound is promised only for default positions
    from dist_sparse_attn import modules as M
    seen = []
    real = M._bucketed_default_positions

    def spy(*a, **kw):
        seen.append(a[5])
        return real(*a, **kw)
    # every head local: shifting positions by whole windows changes nothing (RoPE is
    # relative; the LSH heads would hash differently, their buckets follow RoPE)
    model = GPT(GPTConfig(attention="hash", **{**TINY, "local_heads": 2, "local_window": 8}))
    try:
        M._bucketed_default_positions = spy
        idx2 = torch.randint(0, 256, (1, 48))
        want = model(idx2)[0]
        got = model(idx2, positions=torch.arange(48) + 8 * 1000)[0]  # windows shift whole
    finally:
        M._bucketed_default_positions = real
    assert seen[0] == max(4, -(-48 // 8)) and all(nb is None for nb in seen[2:]), seen
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)   # RoPE is relative
    # the local heads see only their window: output at a window start depends on itself only
    hashed = GPT(cfg)
    a = hashed(idx)[0]
    assert torch.isfinite(a).all() and not torch.allclose(a, dense(idx)[0], atol=1e-4)


def test_layering_model_on_modules():
    """The model is built on the modules and imports no framework: importing and running
    it (every attention) imports neither DeepSpeed nor transformers, and the modules and
    the integrations import no model."""
    import subprocess
    import sys
    code = ("import sys, torch\n"
            "import dist_sparse_attn.integrations, dist_sparse_attn.modules\n"
            "import dist_sparse_attn.integrations.transformers\n"
            "assert 'dist_sparse_attn.model' not in sys.modules, 'modules/integrations import model'\n"
            "from dist_sparse_attn.model import GPT, GPTConfig, parallelize\n"
            "for a in ('dense', 'hash', 'qk', 'none'):\n"
            "    m = parallelize(GPT(GPTConfig(attention=a, n_layer=1, n_embd=16, n_head=2)), None)\n"
            "    m(torch.randint(0, 256, (1, 9)))\n"
            "bad = [m for m in ('deepspeed', 'transformers') if m in sys.modules]\n"
            "assert not bad, f'imported {bad}'\n")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=110)
    assert res.returncode == 0, res.stderr[-3000:]


def test_parallelize_arguments():
    """parallelize: a no-op without a group, ValueError for a bad strategy or group."""
    model = GPT(GPTConfig(attention="hash", **TINY))
    before = [b.attn.core_attn for b in model.transformer.h]
    assert parallelize(model, None) is model
    assert [b.attn.core_attn for b in model.transformer.h] == before
    with pytest.raises(ValueError, match="strategy must be one of"):
        parallelize(model, None, "ring")
    with pytest.raises(ValueError, match="group must be None or a torch.distributed"):
        parallelize(model, "world")


@pytest.mark.parametrize("attention,steps,batch,margin",
                         [("dense", 30, 8, 1.5), ("hash", 12, 4, 1.0), ("qk", 12, 4, 1.0)])
def test_training_loss_falls_on_stdlib_corpus(attention, steps, batch, margin, seed):
    data = TokenData(stdlib_corpus(max_bytes=200_000), val_fraction=0.1)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, seq_len=128, attention=attention,
                          n_buckets=4, qk_keep_rate=0.5))
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=3e-3, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x, y = data.batch("train", 128, batch, gen)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert first > 5.0                      # ~ln(256) at init
    assert last < first - margin, losses     # bytes of Python source: well below uniform


# ---------------------------------------------------------------------------------------------
# sequence parallel: 2 gloo processes
# ---------------------------------------------------------------------------------------------

SP_CASES = {
    # name: (attention, strategy, extra config, pass positions from shard_sequence (else the
    # model finds its offset by an all_gather))
    "dense_bucket": ("dense", "bucket", {}, True),
    "dense_ulysses": ("dense", "ulysses", {}, False),
    "hash_bucket": ("hash", "bucket", {}, False),
    "hash_bucket_ckpt": ("hash", "bucket", {"activation_checkpointing": True}, True),
    # the MLP in chunks of 8 tokens (shards of 19 / 18), nested in the blocks' checkpoints
    "hash_bucket_ckpt_mlp_chunk": ("hash", "bucket", {"activation_checkpointing": True,
                                                      "mlp_chunk": 8}, False),
    # block-local heads take GLOBAL position // window: windows straddle the shard boundary
    "hash_local_bucket": ("hash", "bucket", {"local_heads": 1, "local_window": 8}, False),
    "hash_local_ulysses": ("hash", "ulysses", {"local_heads": 2, "local_window": 16}, True),
    "qk_allgather_keep_all": ("qk", "allgather", {"qk_keep_rate": 1.0}, True),
    # keep rate < 1: the keep ranking is global (all_gather), so shards still agree
    "qk_bucket_half": ("qk", "bucket", {"qk_keep_rate": 0.5}, False),
    "qk_allgather_third_ckpt": ("qk", "allgather", {"qk_keep_rate": 0.3,
                                                    "activation_checkpointing": True}, True),
    # the bucket cap counts the lower ranks' keys of every bucket
    "hash_cap_bucket": ("hash", "bucket", {"bucket_cap": 1.0, "n_buckets": 2}, False),
    "hash_cap_local_ulysses_offload": ("hash", "ulysses", {
        "bucket_cap": 1.0, "n_buckets": 2, "local_heads": 1, "local_window": 8,
        "activation_checkpointing": True, "offload_checkpoints": True}, True),
    "none_bucket": ("none", "bucket", {}, False),
}
N_SP = 37     # odd: shards of 19 and 18 tokens


def _sp_case(name, rank, world, seed):
    import torch.distributed as dist
    attention, strategy, extra, explicit = SP_CASES[name]
    torch.manual_seed(seed)         # the same model and tokens on every rank
    model = GPT(GPTConfig(attention=attention, **{**TINY, **extra}))
    idx = torch.randint(0, 256, (2, N_SP))
    tgt = torch.randint(0, 256, (2, N_SP))
    # single-device result on the full sequence
    full_logits, full_loss = model(idx, tgt)
    full_loss.backward()
    full_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    # this rank's shard, through the process group
    x, pos = shard_sequence(idx, rank, world)
    y, _ = shard_sequence(tgt, rank, world)
    if name == "dense_bucket":      # a group of one rank leaves the model as it is
        singles = [dist.new_group([r]) for r in range(world)]     # (every rank makes each)
        ops = [b.attn.core_attn for b in model.transformer.h]
        assert parallelize(model, singles[rank], strategy) is model
        assert [b.attn.core_attn for b in model.transformer.h] == ops
    assert parallelize(model, dist.group.WORLD, strategy) is model
    logits, loss = model(x, y, positions=pos if explicit else None)
    if rank == 1:   # local positions instead of global ones: RoPE disagrees with rank 0's keys
        wrong = model(x, positions=torch.arange(x.shape[1]))[0]
        if attention != "none":     # (no attention: q and k, and so RoPE, are unused)
            assert not torch.allclose(wrong, full_logits[:, pos], atol=1e-4)
    else:
        model(x, positions=pos)  # same collectives
    torch.testing.assert_close(logits, full_logits[:, pos], rtol=1e-4, atol=1e-5)
    # global mean loss = sum over ranks of local mean * n_r / N; grads summed over ranks
    (loss * x.shape[1] / N_SP).backward()
    for n, p in model.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g)
        torch.testing.assert_close(g, full_grads[n], rtol=1e-3, atol=1e-6,
                                   msg=lambda m, n=n: f"grad of {n}: {m}")


def _sp_worker(rank, world, port, seed, outdir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        for name in SP_CASES:
            try:
                _sp_case(name, rank, world, seed)
                msg = "ok"
            except Exception:   # noqa: BLE001 - reported through the result file
                msg = traceback.format_exc()
            with open(os.path.join(outdir, f"{name}.{rank}"), "w") as f:
                f.write(msg)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sp_results(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("sp_model")
    return run_workers(_sp_worker, 2, outdir, SP_CASES, timeout_s=150,
                       extra_args=(base_seed(),))


@pytest.mark.timeout(200)
@pytest.mark.parametrize("case", list(SP_CASES))
def test_sequence_parallel_model_matches_full_sequence(sp_results, case):
    assert_ranks_ok(sp_results, 2, case)
