"""Hugging Face transformers integration (:mod:`dist_sparse_attn.integrations.transformers`).

One process: tiny randomly initialised Llama / Mistral / Qwen2 models.

* qk mode with keep_rate=1.0 keeps every pair: logits and gradients equal
  ``attn_implementation="sdpa"`` (float32, same weights).
* Padding: padded batches give, on the real tokens, the logits of each row run alone
  without padding (and of sdpa with the same padding mask).
* Packing: documents packed in one row through ``position_ids`` (or
  ``cu_seq_lens_q/k``) give the logits of the documents run separately.
* The Llama wrapper (``build_llama``) trains in hash mode (loss falls) and has the
  GPT interface; bad options, dropout, softcapping, sliding windows, non-causal use,
  4-D masks and KV-cache decoding raise ValueError.

Two gloo processes (one spawn for every case): losses and parameter gradients of
sequence-parallel training equal a one-process run of the same model (float64, so
no LSH bucket flips on rounding):

* "bucket_adapter": DeepSpeed's ``UlyssesSPDataLoaderAdapter`` shards batches with
  padding and packed documents (one spanning the shard boundary, so its bucket count
  comes from both shards); the implementation was registered with ``group=`` (library
  bucket strategy), 4 query heads over ONE kv head on 2 ranks.
* "bucket_wrapper": ``build_llama``'s wrapper sharded by ``parallelize`` with uneven
  shards (qk mode, keep rate 0.6, one kv head; hash mode with a block-local kv head);
  "bucket_errors": bad position_ids on one rank raise
  ValueError on both.
* "alst_hash_gqa" / "alst_qk_mqa": DeepSpeed ALST (``register_with_transformers`` with
  the registered name as ``core_attn_implementation``, heads all-to-all) with hash mode
  + block-local heads (4 heads / 2 kv heads) and qk mode with one kv head (ALST
  replicates it); "alst_padding_refused": a padding mask under ALST raises ValueError
  on both ranks; "alst_engine": ``deepspeed.initialize`` with ALST's mpu (ZeRO-0 and
  ZeRO-3, gradient clipping off) makes the one-process SGD update.
"""
from __future__ import annotations

import datetime
import os
import subprocess
import sys

import pytest
import torch

from helpers import (REPO, assert_close_rel, assert_ranks_ok, base_seed, record_cases,
                     run_workers)

pytest.importorskip("transformers")

from dist_sparse_attn.integrations import transformers as dsa_hf  # noqa: E402

WORLD = 2
JOIN_TIMEOUT_S = 240
PG_TIMEOUT_S = 120     # the first init_distributed in an environment builds a C++ extension
SP_CASES = ["bucket_adapter", "bucket_wrapper", "bucket_errors", "alst_hash_gqa",
            "alst_padding_refused", "alst_qk_mqa", "alst_engine"]
F32 = dict(rtol=1e-5, atol=1e-6)
F64 = dict(rtol=1e-9, atol=1e-12)


def _llama(attn, *, n_kv_head=2, n_head=4, n_embd=32, n_layer=2, vocab=61, dtype=None,
           seed=None, **kw):
    """build_llama with weights drawn from ``seed`` (default: the test seed), so two calls
    give the same weights."""
    torch.manual_seed(base_seed() if seed is None else seed)
    return dsa_hf.build_llama(vocab_size=vocab, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                              n_kv_head=n_kv_head, intermediate_size=48,
                              attn_implementation=attn, dtype=dtype, **kw)


def _family(family, attn, dtype=None, **extra):
    """A tiny model of a transformers family with random weights (seeded)."""
    import transformers as tr
    cls = {"llama": (tr.LlamaConfig, tr.LlamaForCausalLM),
           "mistral": (tr.MistralConfig, tr.MistralForCausalLM),
           "qwen2": (tr.Qwen2Config, tr.Qwen2ForCausalLM)}[family]
    cfg = dict(vocab_size=53, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=6, num_key_value_heads=2, attention_dropout=0.0,
               attn_implementation=attn, use_cache=False)
    if family == "mistral":
        cfg["sliding_window"] = None
    cfg.update(extra)
    torch.manual_seed(base_seed())
    model = cls[1](cls[0](**cfg))
    return model.to(dtype) if dtype is not None else model


@pytest.fixture(scope="module")
def names():
    """Implementations registered once for the module's tests."""
    return dict(
        qk1=dsa_hf.register("test_qk1", mode="qk", keep_rate=1.0, backend="torch"),
        qk=dsa_hf.register("test_qk", mode="qk", keep_rate=0.6, seed=5, backend="torch"),
        hash=dsa_hf.register("test_hash", mode="hash", n_buckets=4, seed=3, backend="torch"),
        hash_local=dsa_hf.register("test_hash_local", mode="hash", bucket_size=8,
                                   local_heads=1, local_window=6, seed=1, backend="torch"),
    )


# ---------------------------------------------------------------------------------------------
# one process
# ---------------------------------------------------------------------------------------------

@pytest.mark.timeout(120)
@pytest.mark.parametrize("family,n_kv", [("llama", 2), ("llama", 1), ("mistral", 2), ("qwen2", 3)])
def test_qk_keep_all_equals_sdpa(names, family, n_kv):
    """keep_rate=1.0 keeps every (token, head): dense causal attention, like sdpa
    (logits and every parameter gradient, float32)."""
    models = [_family(family, a, num_key_value_heads=n_kv) for a in ("sdpa", names["qk1"])]
    models[1].load_state_dict(models[0].state_dict())
    idx = torch.randint(0, 53, (2, 37))
    outs = []
    for m in models:
        out = m(input_ids=idx, labels=idx)
        out.loss.backward()
        outs.append((out.logits.detach(), {n: p.grad for n, p in m.named_parameters()}))
    assert_close_rel(outs[1][0], outs[0][0], name=f"{family} logits", **F32)
    for n, g in outs[0][1].items():
        assert_close_rel(outs[1][1][n], g, name=f"{family} grad {n}", rtol=1e-4, atol=1e-7)


@pytest.mark.timeout(120)
def test_under_autocast_like_sdpa(names):
    """Under bf16 autocast (bf16 q/k/v from the projections) keep_rate=1.0 still gives
    sdpa's logits, to bf16 accuracy, and hash mode trains."""
    sdpa, qk1 = _llama("sdpa"), _llama(names["qk1"])
    idx = torch.randint(0, 61, (2, 41))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, _ = sdpa(idx)
        got, _ = qk1(idx)
        _, loss = _llama(names["hash_local"])(idx, idx)
    assert got.dtype == torch.bfloat16
    assert_close_rel(got, want, name="bf16 logits", rtol=2e-2)
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.timeout(120)
def test_autocast_gives_the_attention_one_dtype(names, monkeypatch):
    """A float32 model under bf16 autocast: RoPE's float32 cos/sin promote q and k to
    float32 while v stays bf16 from its projection. The attention gets all three in the
    autocast dtype, as SDPA does (the Triton kernels take one dtype: mixed inputs failed
    to compile on a GPU)."""
    seen = []
    inner = dsa_hf._attention

    def spy(opts, name, module, query, key, value, *args, **kwargs):
        seen.append((query.dtype, key.dtype, value.dtype))
        return inner(opts, name, module, query, key, value, *args, **kwargs)

    monkeypatch.setattr(dsa_hf, "_attention", spy)
    idx = torch.randint(0, 61, (1, 33))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = _llama(names["hash_local"], n_layer=1)(idx, idx)
    loss.backward()
    assert seen and all(d == (torch.bfloat16,) * 3 for d in seen), seen


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["hash_local", "qk"])
def test_padding_equals_unpadded_rows(names, kind):
    """Left and right padding whose positions continue the row (so only the mask tells
    padding from text): on the real tokens, the logits of each row's real tokens alone."""
    m = _llama(names[kind], dtype=torch.float64).model
    N = 29
    idx = torch.randint(0, 61, (3, N))
    real = torch.ones(3, N, dtype=torch.long)
    real[0, :7] = 0          # left padding
    real[1, 20:] = 0         # right padding
    pos = torch.arange(N).expand(3, N)
    padded = m(input_ids=idx, attention_mask=real, position_ids=pos).logits
    for b in range(3):
        keep = real[b].bool()
        alone = m(input_ids=idx[b:b + 1, keep], position_ids=pos[b:b + 1, keep]).logits[0]
        assert_close_rel(padded[b, keep], alone, name=f"row {b}", **F64)
    if kind == "qk":     # keep_rate 1 is dense among real tokens: sdpa with the same mask
        sdpa, qk1 = _llama("sdpa").model, _llama(names["qk1"]).model
        want = sdpa(input_ids=idx, attention_mask=real, position_ids=pos).logits
        got = qk1(input_ids=idx, attention_mask=real, position_ids=pos).logits
        assert_close_rel(got[real.bool()], want[real.bool()], name="padded qk1 vs sdpa", **F32)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["hash_local", "hash", "qk"])
def test_packed_documents_equal_separate_runs(names, kind):
    """Documents packed through position_ids resets (and through cu_seq_lens) give each
    document's logits run alone; a batch of two rows with different boundaries too."""
    m = _llama(names[kind], dtype=torch.float64).model
    lengths = [(13, 1, 23), (30, 7)]
    N = 37
    idx = torch.randint(0, 61, (2, N))
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    packed = m(input_ids=idx, position_ids=pos).logits
    for b, row in enumerate(lengths):
        a = 0
        for n in row:
            alone = m(input_ids=idx[b:b + 1, a:a + n]).logits[0]
            assert_close_rel(packed[b, a:a + n], alone, name=f"row {b} doc at {a}", **F64)
            a += n
    cu = torch.tensor([0, 13, 14, 37])
    by_cu = m(input_ids=idx[:1], position_ids=pos[:1], cu_seq_lens_q=cu, cu_seq_lens_k=cu,
              max_length_q=23, max_length_k=23).logits
    assert_close_rel(by_cu, packed[:1], name="cu_seq_lens", **F64)


def _no_position_ids_model(family, attn):
    """A tiny model whose attention layers do not receive position_ids (GPTBigCode:
    learned positions, Persimmon: RoPE): only transformers' packed mask tells the
    documents apart."""
    import transformers as tr
    torch.manual_seed(base_seed())
    if family == "gpt_bigcode":
        cfg = tr.GPTBigCodeConfig(vocab_size=53, n_embd=32, n_layer=2, n_head=4,
                                  multi_query=True, attn_pdrop=0.0, resid_pdrop=0.0,
                                  embd_pdrop=0.0, bos_token_id=None, eos_token_id=None,
                                  attn_implementation=attn, use_cache=False)
        return tr.GPTBigCodeForCausalLM(cfg).double()
    cfg = tr.PersimmonConfig(vocab_size=53, hidden_size=32, intermediate_size=40,
                             num_hidden_layers=2, num_attention_heads=4, bos_token_id=None,
                             eos_token_id=None, attn_implementation=attn, use_cache=False)
    return tr.PersimmonForCausalLM(cfg).double()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("family", ["gpt_bigcode", "persimmon"])
@pytest.mark.parametrize("kind", ["hash_local", "qk", "qk1"])
def test_packed_documents_without_position_ids_in_attention(names, family, kind):
    """Models that do not pass position_ids to the attention function: the documents
    come from transformers' packed-sequence mask (through the registered mask function),
    so packed documents still give each document's logits run alone (and keep_rate=1.0
    gives sdpa's, which packs too)."""
    m = _no_position_ids_model(family, names[kind])
    idx = torch.randint(0, 53, (2, 19))
    pos = torch.cat([torch.arange(8), torch.arange(11)])[None].expand(2, 19)
    packed = m(input_ids=idx, position_ids=pos).logits
    alone = torch.cat([m(input_ids=idx[:, :8]).logits, m(input_ids=idx[:, 8:]).logits], 1)
    assert_close_rel(packed, alone, name=f"{family} packed", **F64)
    if kind == "qk1":
        sdpa = _no_position_ids_model(family, "sdpa")
        assert_close_rel(packed, sdpa(input_ids=idx, position_ids=pos).logits,
                         name=f"{family} packed vs sdpa", **F64)


@pytest.mark.timeout(120)
def test_ids_span_documents_and_local_windows(names):
    """Many documents with long positions (local window ids beyond n_buckets): still
    each document alone."""
    m = _llama(names["hash_local"], dtype=torch.float64).model
    idx = torch.randint(0, 61, (1, 40))
    pos = torch.cat([torch.arange(100, 125), torch.arange(15)])[None]   # doc 1 starts at 100
    packed = m(input_ids=idx, position_ids=pos).logits[0]
    first = m(input_ids=idx[:, :25], position_ids=pos[:, :25]).logits[0]
    second = m(input_ids=idx[:, 25:]).logits[0]
    assert_close_rel(packed, torch.cat([first, second]), name="packed", **F64)


@pytest.mark.timeout(120)
def test_hash_wrapper_trains_and_has_the_gpt_interface(names):
    """build_llama in hash mode with block-local heads: (logits, loss) like GPT, AdamW
    groups like GPT, and the loss on real text falls over a few steps."""
    from dist_sparse_attn.data import stdlib_corpus
    model = _llama(names["hash_local"], vocab=256, n_embd=48, n_head=4, n_kv_head=2)
    assert model.get_num_params() == sum(p.numel() for p in model.parameters())
    opt = model.configure_optimizers(0.1, 3e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in
                                                                no_decay["params"])
    text = stdlib_corpus(20_000)
    x = torch.stack([text[i:i + 64] for i in (0, 5000, 10000, 15000)])
    y = torch.stack([text[i + 1:i + 65] for i in (0, 5000, 10000, 15000)])
    logits, none = model(x)
    assert none is None and logits.shape == (4, 64, 256)
    assert dsa_hf.parallelize(model, None) is model and model.sp_group is None  # one device
    with pytest.raises(ValueError, match="strategy must be one of"):
        dsa_hf.parallelize(model, None, "ring")
    losses = []
    for _ in range(12):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses


@pytest.mark.timeout(120)
def test_activation_checkpointing_same_loss_and_grads(names):
    """Recomputing each decoder layer (buckets recomputed too) changes nothing."""
    idx = torch.randint(0, 61, (2, 33))
    tgt = torch.randint(0, 61, (2, 33))
    got = []
    for ckpt in (False, True):
        m = _llama(names["hash_local"], dtype=torch.float64, gradient_checkpointing=ckpt)
        _, loss = m(idx, tgt)
        loss.backward()
        got.append((loss.detach(), {n: p.grad for n, p in m.named_parameters()}))
    assert_close_rel(got[1][0], got[0][0], name="loss", **F64)
    for n, g in got[0][1].items():
        assert_close_rel(got[1][1][n], g, name=f"grad {n}", **F64)


@pytest.mark.timeout(60)
def test_imports_without_transformers():
    """The integration module imports without transformers; register() then raises an
    ImportError naming the extra."""
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import dist_sparse_attn.integrations.transformers as t\n"
            "import dist_sparse_attn.integrations\n"
            "try:\n    t.register('x', mode='qk')\nexcept ImportError as e:\n"
            "    assert 'dist_sparse_attn[hf]' in str(e), e\n    print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50,
                       cwd=REPO)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("world", [2, 3, 5])
def test_sharded_document_facts_equal_whole_sequence(world):
    """Document indices and lengths (real tokens) computed per shard from the gathered
    shard statistics equal those of the whole sequence, for documents spanning several
    shards, starting exactly at a shard edge, one token long, and padded."""
    from dist_sparse_attn.integrations.transformers import (_local_tokens, _shard_stats,
                                                           _tokens_from_stats)
    B, N = 3, 61
    rows = []
    for b in range(B):
        lengths, n = [], 0
        while n < N:
            lengths.append(min(N - n, int(torch.randint(1, 30, ()))))
            n += lengths[-1]
        start = [0] + [int(torch.randint(0, 5, ()))] * (len(lengths) - 1)  # some start > 0
        rows.append(torch.cat([torch.arange(s0, s0 + m) for s0, m in zip(start, lengths)]))
    pos = torch.stack(rows)
    real = torch.rand(B, N) > 0.15
    cuts = sorted(torch.randperm(N - 1)[:world - 1].add(1).tolist())
    bounds = list(zip([0] + cuts, cuts + [N]))
    whole = _local_tokens(pos, real, None, None, True)
    stats = torch.stack([_shard_stats(pos[:, a:b], real[:, a:b]) for a, b in bounds])
    for r, (a, b) in enumerate(bounds):
        tok = _tokens_from_stats(pos[:, a:b], real[:, a:b], stats, r, True)
        assert torch.equal(tok.doc, whole.doc[:, a:b]), (r, tok.doc, whole.doc[:, a:b])
        assert torch.equal(tok.doc_len, whole.doc_len[:, a:b]), r
        assert (tok.n_docs, tok.max_len, tok.max_pos) == \
            (whole.n_docs, whole.max_len, whole.max_pos)


@pytest.mark.timeout(60)
def test_n_buckets_for_rounding():
    assert [dsa_hf.n_buckets_for(n, 512) for n in (1, 512, 1024, 1025, 2049, 32768)] == \
        [2, 2, 2, 4, 6, 64]
    assert dsa_hf.n_buckets_for(100, 7) == 16          # 100 / 16 = 6.25 <= 7 < 100 / 14


@pytest.mark.timeout(120)
def test_unsupported_features_raise(names):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    # attention dropout in training
    m = _family("llama", names["hash"], attention_dropout=0.1)
    idx = torch.randint(0, 53, (1, 9))
    with pytest.raises(ValueError, match="dropout"):
        m.train()(input_ids=idx)
    m.eval()(input_ids=idx)                  # no dropout in eval: runs
    # a sliding window (Mistral's config) is refused by the mask function
    with pytest.raises(ValueError, match="sliding"):
        _family("mistral", names["qk"], sliding_window=4)(input_ids=idx)
    # Qwen2 with sliding layers: refused too
    with pytest.raises(ValueError, match="sliding"):
        _family("qwen2", names["qk"], use_sliding_window=True, sliding_window=4,
                max_window_layers=0)(input_ids=idx)
    fn = ALL_ATTENTION_FUNCTIONS[names["hash"]]
    layer = m.model.layers[0].self_attn
    q, k = torch.randn(1, 6, 9, 8), torch.randn(1, 2, 9, 8)
    for kw, match in ((dict(softcap=30.0), "softcap"), (dict(sliding_window=4), "sliding"),
                      (dict(s_aux=torch.zeros(6)), "sinks"), (dict(is_causal=False), "causal"),
                      (dict(dropout=0.1), "dropout"),
                      (dict(indices=torch.zeros(1, 9, 4, dtype=torch.long)), "indexer")):
        with pytest.raises(ValueError, match=match):
            fn(layer, q, k, k, None, **kw)
    with pytest.raises(ValueError, match="4-D mask"):
        fn(layer, q, k, k, torch.ones(1, 1, 9, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="KV-cache"):
        fn(layer, q[:, :, -1:], k, k, None)
    # generation with a padded prompt: a static cache makes the mask longer than the
    # prompt, a dynamic one grows past the queries; both are the KV-cache error
    pad = torch.ones(1, 9, dtype=torch.long)
    pad[0, :2] = 0
    for kw in (dict(use_cache=True, cache_implementation="static"), dict(use_cache=True)):
        with pytest.raises(ValueError, match="KV-cache"):
            m.generate(input_ids=idx, attention_mask=pad, max_new_tokens=2, do_sample=False,
                       pad_token_id=0, **kw)
    layer.is_causal = False
    with pytest.raises(ValueError, match="causal"):
        fn(layer, q, k, k, None)
    layer.is_causal = True
    assert fn(layer, q, k, k, None)[0].shape == (1, 9, 6, 8)


@pytest.mark.timeout(60)
def test_sharded_loss_one_process_is_the_mean():
    logits = torch.randn(2, 9, 11, dtype=torch.float64)
    labels = torch.randint(0, 11, (2, 9))
    labels[0, 3:5] = -100
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1))
    assert_close_rel(dsa_hf.sharded_loss(logits, labels), want, name="loss", **F64)
    with pytest.raises(ValueError, match="shift_labels"):
        dsa_hf.sharded_loss(logits, labels[:, 1:])


@pytest.mark.timeout(60)
def test_register_validates_options():
    bad = [
        (dict(mode="dense"), "mode"),
        (dict(mode="hash"), "exactly one"),
        (dict(mode="hash", n_buckets=4, bucket_size=64), "exactly one"),
        (dict(mode="hash", n_buckets=3), "n_buckets"),
        (dict(mode="hash", bucket_size=0), "bucket_size"),
        (dict(mode="hash", n_buckets=4, keep_rate=0.5), "keep_rate"),
        (dict(mode="qk", keep_rate=0.0), "keep_rate"),
        (dict(mode="qk", keep_rate=1.5), "keep_rate"),
        (dict(mode="qk", n_buckets=4), "n_buckets"),
        (dict(mode="qk", local_heads=1), "local_heads"),
        (dict(mode="hash", n_buckets=4, local_window=0), "local_window"),
        (dict(mode="hash", n_buckets=4, seed=-1), "seed"),
        (dict(mode="qk", group="world"), "group"),
        (dict(mode="qk", strategy="ring"), "strategy"),
        (dict(mode="qk", backend="cuda"), "backend"),
    ]
    for kw, match in bad:
        with pytest.raises(ValueError, match=match):
            dsa_hf.register("test_bad", **kw)
    for name in ("sdpa", "flash_attention_2", "", None):
        with pytest.raises(ValueError, match="name"):
            dsa_hf.register(name, mode="qk")
    with pytest.raises(ValueError, match="n_kv_head"):
        dsa_hf.build_llama(n_head=4, n_kv_head=3)
    # more local heads than the model has kv heads would make every head local: an error
    # at the first forward, as in SparseAttention and the trainer
    name = dsa_hf.register("test_too_local", mode="hash", bucket_size=8, local_heads=3,
                           backend="torch")
    with pytest.raises(ValueError, match="local_heads=3 must be in \\[0, 2\\]"):
        _llama(name, n_kv_head=2)(torch.randint(0, 61, (1, 12)))


# ---------------------------------------------------------------------------------------------
# two processes: sequence parallelism equals one process
# ---------------------------------------------------------------------------------------------

def _reference_loss(model, batch):
    """One process: the mean next-token CE of the whole batch (labels shifted here,
    computed independently of sharded_loss)."""
    kw = {k: batch[k] for k in ("position_ids", "attention_mask") if k in batch}
    logits = model(input_ids=batch["input_ids"], use_cache=False, **kw).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             batch["labels"][:, 1:].reshape(-1),
                                             ignore_index=-100)


def _sp_step(model, ref, batch, shard, rank, extra):
    """One step of SP training (loss share, backward, gradient all_reduce) and of the
    one-process reference; the losses and every parameter gradient must agree."""
    import torch.distributed as dist
    kw = {k: shard[k] for k in ("position_ids", "attention_mask") if k in shard}
    logits = model(input_ids=shard["input_ids"], use_cache=False, **kw, **extra).logits
    loss = dsa_hf.sharded_loss(logits, shard["shift_labels"], dist.group.WORLD)
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    for p in model.parameters():
        dist.all_reduce(p.grad)
    want = _reference_loss(ref, batch)
    want.backward()
    assert_close_rel(total, want.detach(), name=f"loss (rank {rank})", **F64)
    grads = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        assert_close_rel(p.grad, grads[n].grad, name=f"grad {n} (rank {rank})", **F64)
    for m in (model, ref):
        with torch.no_grad():
            for p in m.parameters():
                p -= 0.5 * p.grad
                p.grad = None
    return float(total)


def _batches(seed, B, N, vocab, docs, pad_head=0):
    """One batch per rank (rank r's data loader yields batch r), with packed documents
    (per-document position_ids), labels = inputs, and optional left padding of row 0
    inside its first document (only the attention mask tells it from text)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(WORLD):
        ids = torch.randint(0, vocab, (B, N), generator=gen)
        pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in docs])
        b = dict(input_ids=ids, position_ids=pos, labels=ids.clone())
        if pad_head:
            mask = torch.ones(B, N, dtype=torch.long)
            mask[0, :pad_head] = 0
            b["attention_mask"] = mask
            b["labels"][mask == 0] = -100
        out.append(b)
    return out


def _adapter(batches, rank, group):
    """DeepSpeed's UlyssesSPDataLoaderAdapter over a loader yielding this rank's batch."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPDataLoaderAdapter
    loader = torch.utils.data.DataLoader([{k: v[i] for k, v in batches[rank].items()}
                                          for i in range(batches[rank]["input_ids"].shape[0])],
                                         batch_size=batches[rank]["input_ids"].shape[0])
    return iter(UlyssesSPDataLoaderAdapter(loader, sp_rank=rank, sp_group=group,
                                           sp_world_size=WORLD, device="cpu"))


def _models(name, seed, **kw):
    """The SP model and an identical reference model using ``ref_name``."""
    models = [_llama(n, dtype=torch.float64, seed=seed, **kw).model for n in name]
    models[1].load_state_dict(models[0].state_dict())
    return models


def _bucket_adapter_case(rank, seed):
    import torch.distributed as dist
    # bucket_size: a document's bucket count needs its length over both shards (no
    # block-local heads: the one kv head hashes)
    opts = dict(mode="hash", bucket_size=4, seed=2, backend="torch")
    name = dsa_hf.register("sp_bucket", group=dist.group.WORLD, **opts)
    ref = dsa_hf.register("sp_bucket_ref", **opts)
    model, reference = _models((name, ref), seed, n_head=4, n_kv_head=1)
    # documents: in row 0 one spans the shard boundary (at 16) and rank 1 holds its end and
    # another; row 1 starts one at the boundary
    batches = _batches(seed, 2, 32, 61, [(11, 9, 12), (16, 9, 7)], pad_head=5)
    it = _adapter(batches, rank, dist.group.WORLD)
    for step in range(WORLD):
        shard = next(it)
        _sp_step(model, reference, batches[step], shard, rank, {})


def _bucket_wrapper_case(rank, seed):
    """build_llama's wrapper sharded by parallelize, uneven shards: qk mode with one kv
    head, and hash mode with block-local heads."""
    configs = [("sp_wrap_qk", dict(mode="qk", keep_rate=0.6, seed=4), dict(n_head=3, n_kv_head=1)),
               ("sp_wrap_hash", dict(mode="hash", n_buckets=4, local_heads=1, local_window=6,
                                     seed=7), dict(n_head=4, n_kv_head=2))]
    for name, opts, heads in configs:
        models = []
        for n in (name, name + "_ref"):
            dsa_hf.register(n, backend="torch", **opts)
            torch.manual_seed(seed)
            models.append(dsa_hf.build_llama(vocab_size=61, n_layer=2, n_embd=24,
                                             intermediate_size=40, attn_implementation=n,
                                             dtype=torch.float64, **heads))
        _wrapper_steps(*models, rank, seed)


def _wrapper_steps(wrap, ref, rank, seed):
    import torch.distributed as dist
    gen = torch.Generator().manual_seed(seed)
    lengths = [23, 18]
    lo, hi = sum(lengths[:rank]), sum(lengths[:rank + 1])
    assert dsa_hf.parallelize(wrap, dist.group.WORLD, "bucket") is wrap
    for step in range(2):
        x = torch.randint(0, 61, (2, sum(lengths) + 1), generator=gen)
        inp, tgt = x[:, :-1], x[:, 1:]
        logits, _ = wrap(inp[:, lo:hi])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 61), tgt[:, lo:hi].reshape(-1),
                                                 reduction="sum") / tgt.numel()
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        for p in wrap.parameters():
            dist.all_reduce(p.grad)
        _, want = ref(inp, tgt)
        want.backward()
        assert_close_rel(total, want.detach(), name=f"loss step {step}", **F64)
        grads = dict(ref.named_parameters())
        for n, p in wrap.named_parameters():
            assert_close_rel(p.grad, grads[n].grad, name=f"grad {n}", **F64)
        for m in (wrap, ref):
            with torch.no_grad():
                for p in m.parameters():
                    p -= 0.5 * p.grad
                    p.grad = None


def _bucket_errors_case(rank):
    """A bad input on one rank raises ValueError on both (no rank left waiting in a
    collective); the group stays in step for the next call."""
    import torch.distributed as dist
    name = dsa_hf.register("sp_err", mode="qk", keep_rate=0.5, group=dist.group.WORLD,
                           backend="torch")
    m = _llama(name).model
    ids = torch.randint(0, 61, (1, 10))
    pos = torch.arange(10 * rank, 10 * rank + 10)[None]
    bad_pos = pos.double() if rank == 1 else pos      # RoPE takes it, attention does not
    with pytest.raises(ValueError, match="position_ids" if rank == 1 else "rank\\(s\\) \\[1\\]"):
        m(input_ids=ids, position_ids=bad_pos)
    with pytest.raises(ValueError, match="strategy"):
        m(input_ids=ids, position_ids=pos, sp_strategy="ring")
    assert m(input_ids=ids, position_ids=pos).logits.shape == (1, 10, 61)
    with pytest.raises(ValueError, match="registered by"):     # sdpa has no sharded form
        dsa_hf.parallelize(_llama("sdpa"), dist.group.WORLD)
    # a model whose attention gets no position_ids: the shards' global positions are
    # unknown (local ones would cut the sequence into one document per shard)
    with pytest.raises(ValueError, match="GLOBAL position_ids"):
        _no_position_ids_model("gpt_bigcode", name)(input_ids=ids % 53, position_ids=pos)


def _alst_register(model, name):
    from deepspeed.runtime.sequence_parallel import parallel_state_sp
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    parallel_state_sp._release_sequence_parallel_groups()     # one ALST setup per case
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model, core_attn_implementation=name, sequence_parallel_size=WORLD,
        micro_batch_size=2, seq_length_is_variable=True)
    _ALST_MPU["mpu"] = mpu
    return mpu.get_sequence_parallel_group()


_ALST, _ALST_MPU = {}, {}


def _alst_case(kind, rank, seed):
    if kind == "hash_gqa":
        opts = dict(mode="hash", bucket_size=6, local_heads=1, local_window=7, seed=6,
                    backend="torch")
        heads = dict(n_head=4, n_kv_head=2)
        docs = [(24,), (5, 19)]
    else:
        opts = dict(mode="qk", keep_rate=0.7, seed=8, backend="torch")
        heads = dict(n_head=4, n_kv_head=1)
        docs = [(10, 14), (24,)]
    name = dsa_hf.register(f"alst_{kind}", **opts)
    ref = dsa_hf.register(f"alst_{kind}_ref", **opts)
    model, reference = _models((name, ref), seed, **heads)
    group = _alst_register(model, name)
    _ALST.update(model=model, group=group)
    batches = _batches(seed, 2, 24, 61, docs)
    it = _adapter(batches, rank, group)
    for step in range(WORLD):
        _sp_step(model, reference, batches[step], next(it), rank, {})


def _alst_padding_case(rank, seed):
    model, group = _ALST["model"], _ALST["group"]
    ids = torch.randint(0, 61, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    if rank == 1:
        mask[1, 9:] = 0            # padding on one rank only: both raise
    pos = torch.arange(12 * rank, 12 * (rank + 1)).expand(2, 12)
    with pytest.raises(ValueError, match="ALST"):
        model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
    full = torch.ones(2, 12, dtype=torch.long)     # an all-ones mask is no padding: runs
    assert model(input_ids=ids, attention_mask=full, position_ids=pos).logits.shape == (2, 12, 61)


def _alst_engine_case(rank, seed):
    """deepspeed.initialize with ALST's mpu (gradient clipping off, SGD): one step on
    engine.backward(sharded_loss) makes the one-process update under ZeRO-0; ZeRO-3
    averages gradients over the sequence-parallel ranks, so there the loss is scaled by
    their number."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param
    opts = dict(mode="hash", n_buckets=4, local_heads=1, local_window=5, seed=3,
                backend="torch")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 61, (2, 24), generator=gen)       # ALST's micro batch: 2
    pos = torch.arange(24).expand(2, 24)
    shift = torch.nn.functional.pad(ids, (0, 1), value=-100)[:, 1:]
    lo, hi = rank * 12, rank * 12 + 12
    for stage in (0, 3):
        name = dsa_hf.register(f"alst_engine{stage}", **opts)
        ref_name = dsa_hf.register(f"alst_engine{stage}_ref", **opts)
        model, ref = (_llama(n, seed=seed).model for n in (name, ref_name))
        ref.load_state_dict(model.state_dict())
        start = {n: p.detach().clone() for n, p in ref.named_parameters()}
        group = _alst_register(model, name)
        config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                  "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True,
                  "zero_optimization": {"stage": stage}}
        engine, *_ = deepspeed.initialize(model=model, config=config,
                                          optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                          mpu=_ALST_MPU["mpu"])
        logits = engine(input_ids=ids[:, lo:hi], position_ids=pos[:, lo:hi]).logits
        loss = dsa_hf.sharded_loss(logits, shift[:, lo:hi], group)
        engine.backward(loss * (WORLD if stage == 3 else 1))
        engine.step()
        _reference_loss(ref, dict(input_ids=ids, position_ids=pos, labels=ids)).backward()
        for n, p in engine.module.named_parameters():
            got = safe_get_full_fp32_param(p) if stage == 3 else p.detach()
            want = -0.1 * dict(ref.named_parameters())[n].grad
            # float32 parameters of norm ||p||: the update is known to ~eps * ||p||
            eps = 4 * torch.finfo(torch.float32).eps * float(start[n].norm())
            assert_close_rel(got - start[n], want, name=f"ZeRO-{stage} update {n}", rtol=1e-4,
                             atol=eps)


def _check(name, rank, seed):
    if name == "bucket_adapter":
        _bucket_adapter_case(rank, seed)
    elif name == "bucket_wrapper":
        _bucket_wrapper_case(rank, seed)
    elif name == "bucket_errors":
        _bucket_errors_case(rank)
    elif name == "alst_hash_gqa":
        _alst_case("hash_gqa", rank, seed)
    elif name == "alst_padding_refused":
        _alst_padding_case(rank, seed)
    elif name == "alst_qk_mqa":
        _alst_case("qk_mqa", rank, seed)
    elif name == "alst_engine":
        _alst_engine_case(rank, seed)
    else:
        raise AssertionError(f"unknown case {name}")


def _worker(rank, world, port, seed, outdir):
    import logging

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_SIZE=str(world))
    torch.set_num_threads(1)
    import deepspeed
    deepspeed.utils.logger.setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False,
                               timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    record_cases(SP_CASES, lambda i, name: _check(name, rank, seed + 101 * i), rank, outdir)


@pytest.fixture(scope="module")
def sp_results(tmp_path_factory):
    pytest.importorskip("deepspeed")
    return run_workers(_worker, WORLD, tmp_path_factory.mktemp("hf_sp"), SP_CASES,
                       JOIN_TIMEOUT_S, extra_args=(base_seed(),))


@pytest.mark.timeout(JOIN_TIMEOUT_S + 60)
@pytest.mark.parametrize("case", SP_CASES)
def test_sequence_parallel_equals_one_process(sp_results, case):
    assert_ranks_ok(sp_results, WORLD, case)
