"""Every invalid input at the public boundary raises a ValueError naming the argument."""
import re

import pytest
import torch

import dist_sparse_attn as dsa

B, NQ, NK, H, HKV, D = 2, 5, 6, 4, 2, 8


def base():
    """A valid bucketed_attention call: dict of its arguments."""
    return dict(q=torch.randn(B, NQ, H, D), k=torch.randn(B, NK, HKV, D),
                v=torch.randn(B, NK, HKV, D), q_buckets=torch.randint(0, 2, (B, NQ, H)),
                k_buckets=torch.randint(0, 2, (B, NK, HKV)))


def call_bucketed(**over):
    a = base()
    a.update(over)
    q, k, v, qb, kb = (a.pop(n) for n in ("q", "k", "v", "q_buckets", "k_buckets"))
    a.setdefault("backend", "torch")
    return dsa.bucketed_attention(q, k, v, qb, kb, **a)


def call_hash(n_buckets=4, **over):
    a = base()
    del a["q_buckets"], a["k_buckets"]
    a.update(over)
    q, k, v = (a.pop(n) for n in "qkv")
    a.setdefault("backend", "torch")
    return dsa.hash_sparse_attention(q, k, v, n_buckets, **a)


def call_qk(**over):
    a = dict(q=torch.randn(B, NQ, H, D), k=torch.randn(B, NK, HKV, D),
             v=torch.randn(B, NK, HKV, D), q_keep=torch.rand(B, NQ, H) < 0.5,
             k_keep=torch.rand(B, NK, HKV) < 0.5)
    a.update(over)
    q, k, v, qk, kk = (a.pop(n) for n in ("q", "k", "v", "q_keep", "k_keep"))
    a.setdefault("backend", "torch")
    return dsa.qk_sparse_attention(q, k, v, qk, kk, **a)


def test_valid_calls_run():
    assert call_bucketed().shape == (B, NQ, H, D)
    assert call_hash().shape == (B, NQ, H, D)
    assert call_qk().shape == (B, NQ, H, D)


META = torch.device("meta")

# (id, keyword overrides of the valid call, regex the message must contain)
QKV_ERRORS = [
    ("q-3d", dict(q=torch.randn(NQ, H, D)), r"q must be 4-D"),
    ("k-5d", dict(k=torch.randn(B, NK, HKV, D, 1)), r"k must be 4-D"),
    ("v-3d", dict(v=torch.randn(NK, HKV, D)), r"v must be 4-D"),
    ("q-not-tensor", dict(q=[[[[1.0]]]]), r"q must be a torch\.Tensor"),
    ("batch-mismatch", dict(k=torch.randn(B + 1, NK, HKV, D), v=torch.randn(B + 1, NK, HKV, D)),
     r"batch size of k \(3\) differs from q \(2\)"),
    ("kv-shape-mismatch", dict(v=torch.randn(B, NK + 1, HKV, D)), r"k .* and v .* same shape"),
    ("k-dtype-mismatch", dict(k=torch.randn(B, NK, HKV, D, dtype=torch.float64)),
     r"k\.dtype torch\.float64 differs from q\.dtype torch\.float32"),
    ("v-dtype-mismatch", dict(v=torch.randn(B, NK, HKV, D, dtype=torch.bfloat16)), r"v\.dtype"),
    ("k-device-mismatch", dict(k=torch.randn(B, NK, HKV, D, device=META)), r"k\.device meta"),
    ("heads-not-multiple", dict(k=torch.randn(B, NK, 3, D), v=torch.randn(B, NK, 3, D)),
     r"q heads \(4\) must be a multiple of k/v heads \(3\)"),
    ("head-dim-mismatch", dict(k=torch.randn(B, NK, HKV, D // 2),
                               v=torch.randn(B, NK, HKV, D // 2)), r"head dim of k/v"),
    ("q-int", dict(q=torch.randint(0, 3, (B, NQ, H, D))), r"q must be float16.*int64"),
    ("k-int", dict(k=torch.randint(0, 3, (B, NK, HKV, D))), r"k must be float16"),
    ("v-bool", dict(v=torch.ones(B, NK, HKV, D, dtype=torch.bool)), r"v must be float16"),
    ("q-empty-seq", dict(q=torch.randn(B, 0, H, D)), r"q must not be empty"),
    ("kv-empty-seq", dict(k=torch.randn(B, 0, HKV, D), v=torch.randn(B, 0, HKV, D)),
     r"k must not be empty"),
    ("empty-batch", dict(q=torch.randn(0, NQ, H, D)), r"q must not be empty"),
    ("bad-backend", dict(backend="cuda"), r"backend must be one of .*'cuda'"),
    ("backend-none", dict(backend=None), r"backend must be one of"),
    ("scale-str", dict(softmax_scale="0.1"), r"softmax_scale .*'0\.1'"),
    ("scale-nan", dict(softmax_scale=float("nan")), r"softmax_scale .*nan"),
    ("scale-inf", dict(softmax_scale=float("inf")), r"softmax_scale .*inf"),
    ("scale-bool", dict(softmax_scale=True), r"softmax_scale"),
    ("scale-tensor", dict(softmax_scale=torch.tensor([0.1, 0.2])), r"softmax_scale"),
    ("causal-str", dict(causal="no"), r"causal must be True or False, got 'no'"),
    ("causal-int", dict(causal=0), r"causal must be True or False"),
    ("return_lse-str", dict(return_lse="yes"), r"return_lse must be True or False"),
]

BUCKETED_ERRORS = QKV_ERRORS + [
    ("q_buckets-shape", dict(q_buckets=torch.zeros(B, NQ, HKV, dtype=torch.int64)),
     r"q_buckets must have shape \(B, N, heads\) = \(2, 5, 4\), got \(2, 5, 2\)"),
    ("k_buckets-shape", dict(k_buckets=torch.zeros(B, NK + 1, HKV, dtype=torch.int64)),
     r"k_buckets must have shape"),
    ("q_buckets-2d", dict(q_buckets=torch.zeros(B, NQ, dtype=torch.int64)), r"q_buckets"),
    ("q_buckets-float", dict(q_buckets=torch.zeros(B, NQ, H)),
     r"q_buckets must have an integer dtype, got torch\.float32"),
    ("k_buckets-bool", dict(k_buckets=torch.zeros(B, NK, HKV, dtype=torch.bool)),
     r"k_buckets must have an integer dtype"),
    ("q_buckets-not-tensor", dict(q_buckets=[[0]]), r"q_buckets must be a torch\.Tensor"),
    ("k_buckets-device", dict(k_buckets=torch.zeros(B, NK, HKV, dtype=torch.int64, device=META)),
     r"k_buckets\.device"),
    ("q_buckets-too-large", dict(q_buckets=torch.full((B, NQ, H), 2 ** 31 - 1)),
     r"q_buckets values must be < 2\*\*31 - 1"),
    ("q_positions-length", dict(q_positions=torch.arange(NQ + 1)),
     r"q_positions must have shape \(N,\) = \(5,\) or \(B, N\) = \(2, 5\)"),
    ("k_positions-batch", dict(k_positions=torch.zeros(B + 1, NK, dtype=torch.int64)),
     r"k_positions must have shape"),
    ("k_positions-float", dict(k_positions=torch.arange(NK).float()),
     r"k_positions must have an integer dtype"),
    ("q_positions-bool", dict(q_positions=torch.ones(NQ, dtype=torch.bool)), r"q_positions"),
    ("q_positions-list", dict(q_positions=list(range(NQ))), r"q_positions must be a torch\.Tensor"),
    ("k_positions-device", dict(k_positions=torch.arange(NK, device=META)), r"k_positions\.device"),
    ("k_positions-int32-overflow", dict(k_positions=torch.arange(NK) + 2 ** 31),
     r"k_positions values must be"),
    ("q_positions-int32-underflow", dict(q_positions=torch.arange(NQ) - 2 ** 31 - 1),
     r"q_positions values must be"),
]


@pytest.mark.parametrize("over,match", [c[1:] for c in BUCKETED_ERRORS],
                         ids=[c[0] for c in BUCKETED_ERRORS])
def test_bucketed_attention_errors(over, match):
    with pytest.raises(ValueError, match=match):
        call_bucketed(**over)


BUCKETED_ERRORS += [
    ("include_self-none", dict(include_self=None), r"include_self must be True or False, got None"),
]

HASH_ERRORS = QKV_ERRORS + [
    ("include_self-none", dict(include_self=None), r"include_self must be True or False"),
    ("n_buckets-odd", dict(n_buckets=5), r"n_buckets must be an even integer >= 2, got 5"),
    ("n_buckets-one", dict(n_buckets=1), r"n_buckets"),
    ("n_buckets-zero", dict(n_buckets=0), r"n_buckets"),
    ("n_buckets-float", dict(n_buckets=4.0), r"n_buckets"),
    ("n_buckets-none", dict(n_buckets=None), r"n_buckets"),
]


@pytest.mark.parametrize("over,match", [c[1:] for c in HASH_ERRORS],
                         ids=[c[0] for c in HASH_ERRORS])
def test_hash_sparse_attention_errors(over, match):
    with pytest.raises(ValueError, match=match):
        call_hash(**over)


QK_ERRORS = QKV_ERRORS + [
    ("q_keep-int", dict(q_keep=torch.ones(B, NQ, H, dtype=torch.int64)),
     r"q_keep must be a bool tensor, got torch\.int64"),
    ("k_keep-float", dict(k_keep=torch.ones(B, NK, HKV)), r"k_keep must be a bool tensor"),
    ("q_keep-list", dict(q_keep=[True]), r"q_keep must be a bool tensor, got list"),
    ("q_keep-shape", dict(q_keep=torch.ones(B, NQ, HKV, dtype=torch.bool)),
     r"q_keep must have shape \(B, N, heads\) = \(2, 5, 4\)"),
    ("k_keep-shape", dict(k_keep=torch.ones(B, NK, H, dtype=torch.bool)),
     r"k_keep must have shape \(B, N, heads\) = \(2, 6, 2\)"),
    ("k_keep-device", dict(k_keep=torch.ones(B, NK, HKV, dtype=torch.bool, device=META)),
     r"k_keep\.device"),
]


@pytest.mark.parametrize("over,match", [c[1:] for c in QK_ERRORS], ids=[c[0] for c in QK_ERRORS])
def test_qk_sparse_attention_errors(over, match):
    with pytest.raises(ValueError, match=match):
        call_qk(**over)


@pytest.mark.parametrize("fn", [call_bucketed, call_hash, call_qk],
                         ids=["bucketed", "hash", "qk"])
def test_triton_on_cpu_needs_interpreter(fn, monkeypatch):
    """backend='triton' on CPU tensors is an error unless TRITON_INTERPRET=1 (read at call time)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=re.escape("TRITON_INTERPRET=1")):
        fn(backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        fn(backend="triton")


@pytest.mark.parametrize("fn", [call_bucketed, call_hash, call_qk],
                         ids=["bucketed", "hash", "qk"])
def test_triton_refuses_float64(fn):
    """The Triton kernels compute in float16/bfloat16/float32: float64 with
    backend='triton' is a ValueError naming the dtype (not an error deep in Triton), and
    backend='auto' takes the PyTorch backend for float64, whose result is exact."""
    d = dict(q=torch.randn(B, NQ, H, D, dtype=torch.float64),
             k=torch.randn(B, NK, HKV, D, dtype=torch.float64),
             v=torch.randn(B, NK, HKV, D, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"backend='triton' supports .*float64"):
        fn(backend="triton", **d)
    assert fn(backend="auto", **d).dtype == torch.float64


def test_module_flags_are_checked():
    with pytest.raises(ValueError, match="causal"):
        dsa.SparseAttention("hash", 4, causal="yes")
    with pytest.raises(ValueError, match="include_self"):
        dsa.SparseAttention("dense", include_self=None)


def test_int32_bucket_at_drop_sentinel():
    """Bucket 2**31 - 1 is rejected for int64 tensors; in int32 tensors it must be
    rejected too, or else attend like any other bucket -- never be silently dropped."""
    a = base()
    qb = torch.full(a["q_buckets"].shape, 2 ** 31 - 1, dtype=torch.int32)
    kb = torch.full(a["k_buckets"].shape, 2 ** 31 - 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="q_buckets"):
        call_bucketed(q_buckets=qb.long(), k_buckets=kb.long())
    try:
        o = dsa.bucketed_attention(a["q"], a["k"], a["v"], qb, kb, backend="torch")
    except ValueError as e:
        assert "q_buckets" in str(e)
        return
    o_ref = dsa.reference_attention(a["q"], a["k"], a["v"], qb, kb)
    assert o_ref.abs().max() > 0
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-6,
                               msg=lambda m: "int32 bucket 2**31 - 1 was silently dropped: " + m)


def test_module_seed_is_checked():
    with pytest.raises(ValueError, match="seed"):
        dsa.SparseAttention("hash", 4, seed="abc")
    with pytest.raises(ValueError, match="seed"):
        dsa.SparseAttention("hash", 4, seed=1.5)


def test_attention_under_autocast_computes_in_the_input_dtype():
    """An enclosing autocast (bf16 on the CPU here) does not recast the backend's inner
    matmuls: same output and gradients as without it, and no dtype-mismatch error."""
    a = base()
    q, k, v = (a[n].requires_grad_() for n in "qkv")
    want = dsa.bucketed_attention(q, k, v, a["q_buckets"], a["k_buckets"], backend="torch")
    gw = torch.autograd.grad(want.sum(), (q, k, v))
    with torch.autocast("cpu", torch.bfloat16):
        got = dsa.bucketed_attention(q, k, v, a["q_buckets"], a["k_buckets"], backend="torch")
        gg = torch.autograd.grad(got.sum(), (q, k, v))
    torch.testing.assert_close(got, want)
    for x, y in zip(gg, gw):
        torch.testing.assert_close(x, y)


def test_mixed_dtypes_refused_on_every_path():
    """q, k, v of different dtypes raise a ValueError on every path, including the
    internal one the modules' block-local heads and the HF integration take (buckets
    made by the caller): the Triton kernels take one dtype."""
    from dist_sparse_attn.ops import _bucketed_default_positions
    a = base()
    q, k, v = a["q"], a["k"], a["v"].bfloat16()
    with pytest.raises(ValueError, match="dtype"):
        _bucketed_default_positions(q, k, v, a["q_buckets"], a["k_buckets"], 2,
                                    backend="torch")
    with pytest.raises(ValueError, match="dtype"):
        dsa.SparseAttention("hash", 4, local_heads=1, local_window=2, backend="torch")(q, k, v)


@pytest.mark.parametrize("opts", [dict(mode="none"),
                                  dict(mode="hash", n_buckets=4, local_heads=1, local_window=2),
                                  dict(mode="qk", keep_rate=0.5)])
def test_module_rules_need_one_length(opts):
    """Modes whose module makes the buckets from positions (or returns v) need q and k/v
    of the same length: a ValueError, not a traceback or an output of k's length."""
    q, k = torch.randn(B, 7, H, D), torch.randn(B, 3, HKV, D)
    with pytest.raises(ValueError, match="same length"):
        dsa.SparseAttention(backend="torch", **opts)(q, k, k)


def test_gpt_forward_checks_its_inputs():
    """Token ids out of the vocabulary, float ids or positions, mismatched targets: a
    ValueError naming the input (not an IndexError / RuntimeError deep inside, nor float
    positions read silently)."""
    from dist_sparse_attn.model import GPT, GPTConfig
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=32, attention="dense"))
    idx = torch.randint(0, 32, (2, 9))
    for call, name in ((lambda: m(idx + 40), "idx"), (lambda: m(idx - 40), "idx"),
                       (lambda: m(idx.float()), "idx"), (lambda: m(idx[0]), "idx"),
                       (lambda: m(idx, idx + 40), "targets"), (lambda: m(idx, idx[:, :3]), "targets"),
                       (lambda: m(idx, positions=torch.arange(5)), "positions"),
                       (lambda: m(idx, positions=torch.arange(9.0)), "positions")):
        with pytest.raises(ValueError, match=name):
            call()
    logits, loss = m(idx, torch.where(idx > 3, idx, -1))    # -1: ignored targets
    assert logits.shape == (2, 9, 32) and torch.isfinite(loss)


def test_lsh_buckets_numpy_group_size_and_empty_head_dim():
    """group_size may be a numpy integer like n_buckets and seed (the same buckets); a
    head dim of 0 has no direction to hash: ValueError."""
    import numpy as np
    x = torch.randn(2, 5, 4, 8)
    assert torch.equal(dsa.lsh_buckets(x, 4, group_size=np.int64(2)),
                       dsa.lsh_buckets(x, 4, group_size=2))
    with pytest.raises(ValueError, match="head dim"):
        dsa.lsh_buckets(torch.randn(2, 5, 4, 0), 4)


def test_unsigned_buckets_and_positions():
    """uint32 / uint64 buckets and positions (torch has no comparisons of them on the
    CPU) are checked as int64: values in range give the int64 result, values out of range
    (a uint64 past 2**63 - 1 included, which would wrap to a negative, dropped bucket)
    raise a ValueError naming the argument."""
    a = base()
    qb, kb = a["q_buckets"].clamp(min=0), a["k_buckets"].clamp(min=0)
    want = dsa.bucketed_attention(a["q"], a["k"], a["v"], qb, kb, backend="torch")
    N = a["q"].shape[1]
    for dt in (torch.uint32, torch.uint64):
        got = dsa.bucketed_attention(a["q"], a["k"], a["v"], qb.to(dt), kb.to(dt),
                                     q_positions=torch.arange(N).to(dt), backend="torch")
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        with pytest.raises(ValueError, match="q_buckets"):
            call_bucketed(q_buckets=torch.full_like(qb, 2 ** 31).to(dt))
    with pytest.raises(ValueError, match="q_buckets.*2\\*\\*63"):
        call_bucketed(q_buckets=torch.full(qb.shape, 2 ** 63 + 5, dtype=torch.uint64))
    with pytest.raises(ValueError, match="q_positions"):
        call_bucketed(q_positions=torch.full((N,), 2 ** 63 + 1, dtype=torch.uint64))


def test_qk_keep_rule_takes_every_seed():
    """Every seed the modules accept, up to 2**63 - 1, works with the position keep rule
    (its 32-bit hash uses the seed mod 2**31), in the module and in the GPT, whose
    ``hash_seed`` stays below 2**62 (layer l uses ``hash_seed + l``)."""
    from dist_sparse_attn.hashing import position_keep
    q = k = v = torch.randn(1, 16, 2, 8)
    for seed in (2 ** 40, 2 ** 63 - 1):
        dsa.SparseAttention("qk", keep_rate=0.5, seed=seed)(q, k, v)
        assert torch.equal(position_keep(torch.arange(64), 1, 2, 0.5, seed, 1),
                           position_keep(torch.arange(64), 1, 2, 0.5, seed % 2 ** 31, 1))
    from dist_sparse_attn.model import GPT, GPTConfig
    model = GPT(GPTConfig(attention="qk", hash_seed=2 ** 62 - 1, n_layer=2, n_head=2,
                          n_embd=16, seq_len=32, vocab_size=32))
    model(torch.randint(0, 32, (1, 16)))
    with pytest.raises(ValueError, match="hash_seed"):
        GPTConfig(hash_seed=2 ** 62)
