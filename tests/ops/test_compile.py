"""torch.compile of the public functions: the custom ops of
``dist_sparse_attn.compile_ops`` give outputs and q/k/v gradients equal to eager
(the same function uncompiled), ``bucketed_attention`` compiles with
``fullgraph=True``, and the fake implementations match the real ops (shapes,
dtypes, strides; ``torch.library.opcheck``) per backend.

The PyTorch backend is compiled on the CPU; the Triton backend (``triton_device``) on
the CPU under TRITON_INTERPRET=1 and on a CUDA GPU, and the ops are checked on both
devices.
"""
import pytest
import torch

import dist_sparse_attn as dsa
from dist_sparse_attn import compile_ops
from dist_sparse_attn.layout import bucket_keys
from helpers import triton_runs_on

pytestmark = pytest.mark.filterwarnings(
    "ignore:Dynamo detected a call to a `functools.lru_cache`:UserWarning")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _inputs(B, Nq, Nk, H, Hkv, D, dtype=torch.float32, n_buckets=3, dropped=True,
            device="cpu"):
    q = torch.randn(B, Nq, H, D, dtype=dtype, device=device)
    k = torch.randn(B, Nk, Hkv, D, dtype=dtype, device=device)
    v = torch.randn(B, Nk, Hkv, D, dtype=dtype, device=device)
    lo = -1 if dropped else 0
    qb = torch.randint(lo, n_buckets, (B, Nq, H), device=device)
    kb = torch.randint(lo, n_buckets, (B, Nk, Hkv), device=device)
    return q, k, v, qb, kb


def _run(fn, q, k, v, *rest, upstream):
    """Outputs of fn(q, k, v, *rest) and the gradients of q, k, v for the
    given upstream gradients (one per output; None: output unused)."""
    xs = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    out = fn(*xs, *rest)
    outs = out if isinstance(out, tuple) else (out,)
    pairs = [(o, g) for o, g in zip(outs, upstream) if g is not None]
    grads = torch.autograd.grad([o for o, _ in pairs], xs, [g for _, g in pairs])
    return tuple(o.detach() for o in outs), grads


def _assert_same(got, want):
    (go, gg), (wo, wg) = got, want
    for name, a, b in [*zip(("o", "lse"), go, wo), *zip(("dq", "dk", "dv"), gg, wg)]:
        torch.testing.assert_close(a, b, msg=lambda m, n=name: f"{n}: {m}")


def _compare(fn, args, upstream, *, backend, fullgraph=True, **compile_kw):
    want = _run(fn, *args, upstream=upstream)
    cfn = torch.compile(fn, backend=backend, fullgraph=fullgraph, **compile_kw)
    got = _run(cfn, *args, upstream=upstream)
    _assert_same(got, want)
    return cfn


def _upstream(q, H, dtype=None, lse=True):
    B, Nq, _, D = q.shape
    g_o = torch.randn(B, Nq, H, D, dtype=dtype or q.dtype, device=q.device)
    return (g_o, torch.randn(B, H, Nq, device=q.device)) if lse else (g_o,)


# ------------------------------------------------------------------ bucketed

@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("causal,include_self", [(True, True), (True, False), (False, True)],
                         ids=["causal", "causal-noself", "noncausal"])
def test_bucketed_fullgraph_matches_eager(compile_backend, dtype, causal, include_self):
    q, k, v, qb, kb = _inputs(2, 45, 37, 4, 2, 16, dtype)
    qpos, kpos = torch.randperm(45), torch.randperm(37)

    def fn(q, k, v, qb, kb):
        o, lse = dsa.bucketed_attention(q, k, v, qb, kb, q_positions=qpos, k_positions=kpos,
                                        causal=causal, include_self=include_self,
                                        softmax_scale=0.3, return_lse=True, backend="torch")
        return o * 2, torch.where(torch.isinf(lse), 0.0, lse)

    _compare(fn, (q, k, v, qb, kb), _upstream(q, 4), backend=compile_backend)


@pytest.mark.parametrize("which", ["o-only", "lse-only"])
def test_bucketed_one_output_used(which):
    """dlse is None (lse unused) or do is None (o unused) in the op's backward."""
    q, k, v, qb, kb = _inputs(1, 40, 40, 2, 1, 16, dropped=False)

    if which == "o-only":
        def fn(q, k, v, qb, kb):
            return dsa.bucketed_attention(q, k, v, qb, kb, backend="torch")
        upstream = _upstream(q, 2, lse=False)
    else:
        def fn(q, k, v, qb, kb):
            return dsa.bucketed_attention(q, k, v, qb, kb, return_lse=True,
                                          backend="torch")[1]
        upstream = (torch.randn(1, 2, 40),)
    _compare(fn, (q, k, v, qb, kb), upstream, backend="aot_eager")


def test_bucketed_noncontiguous_inputs_and_module():
    """q, k, v as strided views of one projection, inside an nn.Module."""
    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(32, 3 * 32)

        def forward(self, x, qb, kb):
            B, N, _ = x.shape
            q, k, v = self.qkv(x).view(B, N, 3, 2, 16).unbind(2)
            return dsa.bucketed_attention(q, k, v, qb, kb, backend="torch").reshape(B, N, 32)

    m = Attn()
    x = torch.randn(2, 50, 32)
    qb, kb = torch.randint(0, 3, (2, 50, 2)), torch.randint(0, 3, (2, 50, 2))
    want = m(x, qb, kb)
    want_g = torch.autograd.grad(want.square().sum(), m.parameters())
    cm = torch.compile(m, backend="aot_eager", fullgraph=True)
    got = cm(x, qb, kb)
    got_g = torch.autograd.grad(got.square().sum(), m.parameters())
    torch.testing.assert_close(got, want)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b)


def test_bucketed_dynamic_shapes():
    """A second sequence length recompiles with symbolic sizes (automatic dynamic)."""
    def fn(q, k, v, qb, kb):
        return dsa.bucketed_attention(q, k, v, qb, kb, return_lse=True, backend="torch")

    cfn = torch.compile(fn, backend="aot_eager", fullgraph=True)
    for N in (40, 56, 61):
        q, k, v, qb, kb = _inputs(2, N, N, 2, 2, 16)
        upstream = _upstream(q, 2)
        _assert_same(_run(cfn, q, k, v, qb, kb, upstream=upstream),
                     _run(fn, q, k, v, qb, kb, upstream=upstream))


def test_graph_holds_the_custom_op():
    """One graph, the attention in it as the opaque forward op."""
    targets = []

    def record(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    q, k, v, qb, kb = _inputs(1, 30, 30, 2, 2, 8)
    torch.compile(lambda *a: dsa.bucketed_attention(*a, backend="torch"), backend=record,
                  fullgraph=True)(q, k, v, qb, kb)
    assert any("dist_sparse_attn.attn_fwd" in t for t in targets), targets


def test_bucketed_inductor():
    q, k, v, qb, kb = _inputs(1, 48, 48, 2, 1, 16)

    def fn(q, k, v, qb, kb):
        o, lse = dsa.bucketed_attention(q, k, v, qb, kb, return_lse=True, backend="torch")
        return o.relu(), torch.where(torch.isinf(lse), 0.0, lse)

    _compare(fn, (q, k, v, qb, kb), _upstream(q, 2), backend="inductor")


def test_compiled_range_check_still_fires():
    """Host-side value checks are replaced by an async assert while compiling."""
    q, k, v, qb, kb = _inputs(1, 20, 20, 2, 2, 8)

    def fn(q, k, v, qb, kb):
        return dsa.bucketed_attention(q, k, v, qb, kb, backend="torch")

    cfn = torch.compile(fn, backend="aot_eager", fullgraph=True)
    cfn(q, k, v, qb, kb)
    with pytest.raises(RuntimeError, match="q_buckets values must be"):
        cfn(q, k, v, torch.full_like(qb, 2 ** 31 - 1), kb)


# ------------------------------------------------------------ hash / QK-sparse

@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
def test_hash_sparse_matches_eager(compile_backend):
    q, k, v, _, _ = _inputs(2, 60, 60, 4, 2, 16)

    def fn(q, k, v):
        return dsa.hash_sparse_attention(q, k, v, 4, seed=3, return_lse=True, backend="torch")

    # the LSH rotations (a cached CPU generator draw) may break the graph
    _compare(fn, (q, k, v), _upstream(q, 4), backend=compile_backend, fullgraph=False)


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
def test_qk_sparse_fullgraph_matches_eager(compile_backend):
    q, k, v, _, _ = _inputs(2, 50, 50, 2, 1, 16)
    q_keep, k_keep = torch.rand(2, 50, 2) < 0.6, torch.rand(2, 50, 1) < 0.6

    def fn(q, k, v):
        return dsa.qk_sparse_attention(q, k, v, q_keep, k_keep, backend="torch")

    _compare(fn, (q, k, v), _upstream(q, 2, lse=False), backend=compile_backend)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("fn_name", ["bucketed", "hash", "qk"])
def test_raw_lse_of_dropped_rows_gqa_no_self(fn_name, compile_backend):
    """The three public functions under fullgraph compilation, GQA (H=4, Hkv=2), causal
    with include_self=False (hash, bucketed), returning lse UNMASKED: dropped and empty
    rows have lse -inf and get a nonzero upstream dlse. Outputs and q/k/v gradients
    equal eager's, and no gradient is NaN (the other tests mask lse before using it)."""
    q, k, v, qb, kb = _inputs(2, 40, 40, 4, 2, 16)
    qb[:, :6] = -1                                  # whole rows dropped
    q_keep, k_keep = qb >= 0, kb >= 0
    calls = {
        "bucketed": lambda q, k, v: dsa.bucketed_attention(
            q, k, v, qb, kb, include_self=False, return_lse=True, backend="torch"),
        "hash": lambda q, k, v: dsa.hash_sparse_attention(
            q, k, v, 4, seed=21, include_self=False, return_lse=True, backend="torch"),
        "qk": lambda q, k, v: dsa.qk_sparse_attention(
            q, k, v, q_keep, k_keep, return_lse=True, backend="torch"),
    }
    fn = calls[fn_name]
    o, lse = fn(q, k, v)        # eager first: the LSH rotations are cached before tracing
    assert torch.isinf(lse).any() and not torch.isnan(lse).any()
    upstream = _upstream(q, 4)
    _compare(fn, (q, k, v), upstream, backend=compile_backend)
    _, grads = _run(torch.compile(fn, backend=compile_backend, fullgraph=True), q, k, v,
                    upstream=upstream)
    assert all(torch.isfinite(g).all() for g in grads)


# ------------------------------------------------------------------- Triton

@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
def test_triton_bucketed_fullgraph_matches_eager(triton_device, compile_backend):
    q, k, v, qb, kb = _inputs(1, 45, 40, 4, 2, 16, device=triton_device)

    def fn(q, k, v, qb, kb):
        o, lse = dsa.bucketed_attention(q, k, v, qb, kb, return_lse=True, backend="triton")
        return o, torch.where(torch.isinf(lse), 0.0, lse)

    _compare(fn, (q, k, v, qb, kb), _upstream(q, 4), backend=compile_backend)


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
def test_triton_hash_sparse_matches_eager(triton_device, compile_backend):
    q, k, v, _, _ = _inputs(1, 40, 40, 2, 2, 16, device=triton_device)

    def fn(q, k, v):
        return dsa.hash_sparse_attention(q, k, v, 4, backend="triton")

    _compare(fn, (q, k, v), _upstream(q, 2, lse=False), backend=compile_backend,
             fullgraph=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_compiled_errors_are_the_eager_ones(monkeypatch):
    """Validation errors surface as the same ValueErrors (without fullgraph,
    dynamo hands a raising frame back to eager)."""
    q, k, v, qb, kb = _inputs(1, 20, 20, 2, 2, 8)

    def fn(q, k, v, qb, kb, backend):
        return dsa.bucketed_attention(q, k, v, qb, kb, backend=backend)

    cfn = torch.compile(fn, backend="aot_eager")
    with pytest.raises(ValueError, match="k_buckets must have shape"):
        cfn(q, k, v, qb, kb[:, :5], "torch")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA"):
        cfn(q, k, v, qb, kb, "triton")
    from dist_sparse_attn import kernels
    assert kernels.resolve("auto", torch.device("cpu"), torch.float32) == "torch"


# ------------------------------------------------------------------- the ops

@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16],
                         ids=["f32", "f64", "f16"])
@pytest.mark.parametrize("strided", [False, True], ids=["contig", "strided"])
def test_opcheck(device, backend, dtype, strided):
    """Fake implementations (shapes, dtypes, strides), schema and autograd
    registration of attn_fwd and attn_bwd match the real ops."""
    if backend == "triton" and not triton_runs_on(device):
        pytest.skip("Triton runs on CPU tensors only under TRITON_INTERPRET=1")
    if backend == "triton" and dtype != torch.float32:
        pytest.skip("one dtype suffices for the Triton fakes (the interpreter is slow)")
    B, N, H, Hkv, D = 2, 21, 4, 2, 16
    if strided:     # views of one (B, N, 3, H, D) projection, k and v not dense
        x = torch.randn(B, N, 3, H, D, dtype=dtype, device=device, requires_grad=True)
        q, k, v = x[:, :, 0], x[:, :, 1, :Hkv], x[:, :, 2, :Hkv]
    else:
        q, k, v = (t.requires_grad_(True)
                   for t in _inputs(B, N, N, H, Hkv, D, dtype, device=device)[:3])
    qb = torch.randint(-1, 3, (B, N, H), device=device)
    kb = torch.randint(-1, 3, (B, N, Hkv), device=device)
    pos = torch.arange(N, device=device).expand(B, N)
    meta = (bucket_keys(qb, pos),
            bucket_keys(kb, torch.randperm(N, device=device).expand(B, N)), True, True,
            None, backend)
    torch.library.opcheck(compile_ops.attn_fwd, (q, k, v, *meta))
    with torch.no_grad():
        o, lse, aux = compile_ops.attn_fwd(q, k, v, *meta)
    do = torch.randn_like(o)
    for dlse in (None, torch.randn_like(lse)):
        torch.library.opcheck(compile_ops.attn_bwd,
                              (do, dlse, q.detach(), k.detach(), v.detach(), o, lse, aux, *meta),
                              test_utils=("test_schema", "test_faketensor"))


def _integer_aranges(fn, *args):
    """dtypes of the integer ``torch.arange`` calls in the graph dynamo traces of
    ``fn(*args)`` (one graph, no break)."""
    found = []

    def record(gm, example_inputs):
        for n in gm.graph.nodes:
            if n.op == "call_function" and n.target is torch.arange:
                dt = n.meta["example_value"].dtype
                if not dt.is_floating_point:
                    found.append(dt)
        return gm

    fn(*args)           # eager first: the LSH rotations are drawn outside the trace
    torch.compile(fn, backend=record, fullgraph=True)(*args)
    return found


@pytest.mark.parametrize("case", ["hash", "qk", "module-hash-local", "module-qk-rule",
                                  "gpt-hash-local", "gpt-qk"])
def test_no_integer_arange_in_traced_graphs(case):
    """Inductor computes ``torch.arange`` in its kernels' int32 index type whatever the
    dtype asked for, so integer arithmetic on default positions (the stream keys
    ``bucket << 32 | (pos + 2**31)``, the keep rule's hash) fails to compile or wraps
    on a GPU. Every integer position range in a traced graph must come from the opaque
    ``dist_sparse_attn::arange`` instead (the CPU's C++ inductor computes in int64, so
    only the graph shows the difference here)."""
    from dist_sparse_attn.model import GPT, GPTConfig
    q, k, v, qb, kb = _inputs(2, 40, 40, 4, 2, 8)
    if case == "hash":
        args = (lambda q, k, v: dsa.hash_sparse_attention(q, k, v, 4, backend="torch"),
                q, k, v)
    elif case == "qk":
        args = (lambda q, k, v, a, b: dsa.qk_sparse_attention(q, k, v, a, b, backend="torch"),
                q, k, v, qb >= 1, kb >= 1)
    elif case.startswith("module"):
        m = dsa.SparseAttention("hash", 4, local_heads=1, local_window=8, backend="torch") \
            if case == "module-hash-local" else \
            dsa.SparseAttention("qk", keep_rate=0.5, backend="torch")
        args = (m, q, k, v)
    else:
        attention, local = ("hash", 2) if case == "gpt-hash-local" else ("qk", 0)
        model = GPT(GPTConfig(n_layer=1, n_head=4, n_embd=32, seq_len=64, n_buckets=4,
                              attention=attention, local_heads=local, local_window=16))
        args = (lambda idx: model._forward(idx, None, None), torch.randint(0, 256, (2, 64)))
    assert _integer_aranges(*args) == []
