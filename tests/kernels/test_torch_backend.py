"""The tiled PyTorch backend (``backend="torch"``) against the float64 oracle.

Every case checks o, lse and the gradients of q, k, v for random upstream
gradients of both o and lse. Cases cover odd sizes, Nq != Nk, GQA/MQA,
include_self, causal and non-causal, skewed/empty/huge/dropped buckets,
explicit positions and rows with no allowed key. Each runs twice: with the
backend's own tile size, and with 16-row tiles and 5-tile chunks (``small``),
so that small inputs still span many tiles, partial tiles, skipped tiles and
online-softmax merges across chunks.

The tests against the oracle take the ``device`` fixture: the backend runs on CPU
tensors and, when there is a GPU, on CUDA tensors (inputs drawn on the CPU, then moved).
"""
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

import dist_sparse_attn as dsa
from dist_sparse_attn._validation import normalize_positions
from dist_sparse_attn.hashing import keep_to_buckets
from dist_sparse_attn.kernels import torch_tiled
from dist_sparse_attn.kernels.torch_tiled import tile_stats
from dist_sparse_attn.plan import make_plan
from helpers import assert_close_rel, assert_dropped_values_unread, grads, rand_qkv, rel_err

F64 = torch.float64
INT32_MAX = 2 ** 31 - 1


# ----------------------------------------------------------------------------- inputs

def make_buckets(kind, B, N, heads):
    """Integer buckets (B, N, heads) of the named kind."""
    shape = (B, N, heads)
    if kind == "dense":                      # dense causal attention
        return torch.zeros(shape, dtype=torch.int64)
    if kind == "random4":
        return torch.randint(0, 4, shape)
    if kind == "one-bucket":                 # maximal skew: everything in bucket 7
        return torch.full(shape, 7, dtype=torch.int64)
    if kind == "skewed":                     # ~90% in bucket 0, the rest spread over 1..7
        return torch.where(torch.rand(shape) < 0.9, 0, torch.randint(1, 8, shape))
    if kind == "empty-buckets":              # 64 buckets for <= 63 tokens: many empty
        return torch.randint(0, 64, shape)
    if kind == "dropped":                    # ~30% negative (dropped), some very negative
        neg = torch.where(torch.rand(shape) < 0.5, -1, -(2 ** 40))
        return torch.where(torch.rand(shape) < 0.3, neg, torch.randint(0, 3, shape))
    if kind == "huge-ids":                   # ids up to the largest allowed one
        ids = torch.tensor([0, 12345, 2 ** 30, INT32_MAX - 1])
        return ids[torch.randint(0, 4, shape)]
    raise KeyError(kind)


def make_positions(kind, B, N):
    """Positions (N,) or (B, N), or None for the default arange(N)."""
    if kind == "default":
        return None
    if kind == "perm":
        return torch.randperm(N)
    if kind == "perm-batch":
        return torch.stack([torch.randperm(N) for _ in range(B)])
    if kind == "dup-negative":               # repeated and negative positions
        return torch.randint(-N // 2, N // 2 + 1, (B, N))
    if kind == "int32-extremes":             # the widest range the API accepts
        lo, hi = -INT32_MAX + 1, INT32_MAX - 1
        p = torch.randint(lo, hi, (B, N))
        p[:, 0], p[:, -1] = lo, hi
        return p
    raise KeyError(kind)


@dataclass(frozen=True)
class Case:
    id: str
    Nq: int
    Nk: Optional[int] = None                 # default: Nq
    H: int = 2
    Hkv: int = 2
    D: int = 16
    B: int = 2
    buckets: str = "random4"
    positions: str = "default"
    causal: bool = True
    include_self: bool = True
    scale: Optional[float] = None

    @property
    def nk(self):
        return self.Nq if self.Nk is None else self.Nk


CASES = [
    Case("n1", 1),
    Case("n1-noself-empty", 1, include_self=False),
    Case("n7", 7),
    Case("n63", 63),
    Case("n257", 257),
    Case("nq63-nk100", 63, 100),
    Case("nq100-nk63", 100, 63),
    Case("gqa-h4-kv2", 63, H=4, Hkv=2),
    Case("mqa-h4-kv1", 63, 70, H=4, Hkv=1),
    Case("noself", 63, include_self=False),
    Case("noncausal", 63, causal=False),
    Case("noncausal-nq63-nk100", 63, 100, causal=False),
    Case("dense-n257", 257, buckets="dense"),
    Case("dense-noself", 63, buckets="dense", include_self=False),
    Case("one-bucket", 100, buckets="one-bucket"),
    Case("skewed", 130, buckets="skewed"),
    Case("empty-buckets", 63, buckets="empty-buckets"),
    Case("dropped", 100, buckets="dropped"),
    Case("dropped-gqa-noncausal", 63, H=4, Hkv=2, buckets="dropped", causal=False),
    Case("huge-ids", 63, buckets="huge-ids"),
    Case("positions-perm", 63, 80, positions="perm"),
    Case("positions-perm-batch", 100, positions="perm-batch"),
    Case("positions-dup-negative-noself", 63, positions="dup-negative", include_self=False),
    Case("positions-int32-extremes", 63, positions="int32-extremes"),
    Case("scale-0.3", 63, scale=0.3),
    Case("d3-b1-h1", 40, H=1, Hkv=1, D=3, B=1),
]

TOL = {  # dtype -> (rtol for o and gradients, rtol for lse (always float32), atol)
    torch.float32: (1e-5, 1e-5, 1e-5),
    torch.float64: (1e-10, 1e-6, 1e-10),
}


@pytest.fixture(params=["default-tiles", "small-tiles"])
def tiles(request, monkeypatch):
    """``small-tiles``: 16-row tiles and 5 tile pairs per chunk, so small inputs exercise
    many tiles, tile skipping and the online softmax across chunks."""
    if request.param == "small-tiles":
        monkeypatch.setattr(torch_tiled, "_BLOCK", 16)
        monkeypatch.setattr(torch_tiled, "_CHUNK_BYTES", 5 * 16 * 16 * 8)
        assert _stats(64, 2)["block"] == 16, "the backend no longer takes its tile size from _BLOCK"
    return request.param


def to(device, *tensors):
    """The tensors (None stays None) moved to ``device``."""
    return tuple(None if t is None else t.to(device) for t in tensors)


def case_inputs(c: Case, dtype, device="cpu"):
    q, k, v = rand_qkv(c.B, c.Nq, c.nk, c.H, c.Hkv, c.D, dtype)
    qpos, kpos = to(device, make_positions(c.positions, c.B, c.Nq),
                    make_positions(c.positions, c.B, c.nk))
    kw = dict(q_positions=qpos, k_positions=kpos,
              causal=c.causal, include_self=c.include_self, softmax_scale=c.scale)
    qb = make_buckets(c.buckets, c.B, c.Nq, c.H)
    kb = make_buckets(c.buckets, c.B, c.nk, c.Hkv)
    return (*to(device, q, k, v, qb, kb), kw)


def oracle(q, k, v, qb, kb, do, dlse, **kw):
    """(o, lse), (dq, dk, dv) of the reference in float64."""
    def f(q, k, v):
        return dsa.reference_attention(q, k, v, qb, kb, return_lse=True, **kw)
    return grads(f, (q.double(), k.double(), v.double()),
                 (do.double(), None if dlse is None else dlse), return_out=True)


def backend(q, k, v, qb, kb, do, dlse, backend="torch", **kw):
    def f(q, k, v):
        return dsa.bucketed_attention(q, k, v, qb, kb, return_lse=True, backend=backend, **kw)
    return grads(f, (q, k, v), (do, dlse), return_out=True)


def upstream(c: Case, dtype, lse_ref):
    """Random do, and a random dlse that is 0 where lse is -inf (on lse_ref's device)."""
    do = torch.randn(c.B, c.Nq, c.H, c.D).to(dtype).to(lse_ref.device)
    dlse = torch.randn(c.B, c.H, c.Nq).to(lse_ref.device).masked_fill(torch.isinf(lse_ref), 0.0)
    return do, dlse


# ----------------------------------------------------------------------------- vs the oracle

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_matches_reference(device, c, dtype, tiles):
    q, k, v, qb, kb, kw = case_inputs(c, dtype, device)
    _, lse0 = dsa.reference_attention(q, k, v, qb, kb, return_lse=True, **kw)
    do, dlse = upstream(c, dtype, lse0)
    (o_ref, lse_ref), g_ref = oracle(q, k, v, qb, kb, do, dlse, **kw)
    (o, lse), g = backend(q, k, v, qb, kb, do, dlse, **kw)
    rtol, rtol_lse, atol = TOL[dtype]
    assert o.dtype == dtype and o.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (c.B, c.H, c.Nq)
    assert_close_rel(o, o_ref, rtol, "o", atol=atol)
    assert_close_rel(lse, lse_ref, rtol_lse, "lse", atol=atol)
    for name, a, e in zip(("dq", "dk", "dv"), g, g_ref):
        assert a.dtype == dtype
        assert_close_rel(a, e, rtol, name, atol=atol)


GRAD_CASES = [c for c in CASES if c.id in ("n63", "gqa-h4-kv2", "dropped", "noself",
                                           "positions-perm-batch", "n257")]


@pytest.mark.parametrize("which", ["o-only", "lse-only"])
@pytest.mark.parametrize("c", GRAD_CASES, ids=[c.id for c in GRAD_CASES])
def test_gradients_of_one_output(device, c, which, tiles):
    """Backward when only o (return_lse=False) or only lse receives a gradient."""
    q, k, v, qb, kb, kw = case_inputs(c, torch.float32, device)
    _, lse0 = dsa.reference_attention(q, k, v, qb, kb, return_lse=True, **kw)
    do, dlse = upstream(c, torch.float32, lse0)
    if which == "o-only":
        g = grads(lambda q, k, v: dsa.bucketed_attention(q, k, v, qb, kb, backend="torch", **kw),
                  (q, k, v), do)
        _, g_ref = oracle(q, k, v, qb, kb, do, None, **kw)
    else:
        g = grads(lambda q, k, v: dsa.bucketed_attention(q, k, v, qb, kb, backend="torch",
                                                         return_lse=True, **kw)[1],
                  (q, k, v), dlse)
        _, g_ref = oracle(q, k, v, qb, kb, torch.zeros_like(do), dlse, **kw)
    for name, a, e in zip(("dq", "dk", "dv"), g, g_ref):
        assert_close_rel(a, e, 1e-5, name, atol=1e-5)


def test_empty_rows_with_lse_gradient(device, tiles):
    """Rows with no allowed key: o = 0, lse = -inf, zero dq and no NaN anywhere, even
    when the upstream gradient of lse is non-zero on those rows."""
    B, N, H, D = 2, 50, 2, 8
    q, k, v = rand_qkv(B, N, N, H, H, D)
    qb = make_buckets("dropped", B, N, H)
    kb = make_buckets("dropped", B, N, H)
    qb[:, 0] = 0                                  # position 0 without self: always empty
    do = torch.randn(B, N, H, D)
    dlse = torch.randn(B, H, N)                   # non-zero everywhere, empty rows included
    q, k, v, qb, kb, do, dlse = to(device, q, k, v, qb, kb, do, dlse)
    (o, lse), (dq, dk, dv) = backend(q, k, v, qb, kb, do, dlse, include_self=False)
    _, g_ref = oracle(q, k, v, qb, kb, do, dlse, include_self=False)
    empty = torch.isinf(lse)                      # (B, H, N)
    assert empty[:, :, 0].all() and (~empty).any()
    assert (lse[empty] < 0).all()
    rows = empty.transpose(1, 2)                  # (B, N, H)
    assert torch.equal(o[rows], torch.zeros_like(o[rows]))
    assert torch.equal(dq[rows], torch.zeros_like(dq[rows]))
    for name, a, e in zip(("dq", "dk", "dv"), (dq, dk, dv), g_ref):
        assert torch.isfinite(a).all(), f"{name} has NaN/inf"
        assert_close_rel(a, e, 1e-5, name, atol=1e-5)


def test_everything_dropped(device, tiles):
    B, N, H, D = 2, 33, 2, 8
    q, k, v = to(device, *rand_qkv(B, N, N, H, H, D))
    b = torch.full((B, N, H), -3, device=device)
    (o, lse), g = backend(q, k, v, b, b, *to(device, torch.randn(B, N, H, D),
                                            torch.randn(B, H, N)))
    assert torch.equal(o, torch.zeros_like(o))
    assert torch.isneginf(lse).all()
    for x in g:
        assert torch.equal(x, torch.zeros_like(x))


# ----------------------------------------------------------------------------- low precision

HALF_CASES = [c for c in CASES if c.id in ("n63", "n257", "gqa-h4-kv2", "nq63-nk100",
                                           "dropped", "noself")]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("c", HALF_CASES, ids=[c.id for c in HALF_CASES])
def test_low_precision(device, c, dtype):
    """fp16/bf16: the backend's error against the float64 oracle (on the same rounded
    inputs) is at most 2x the error of the same attention computed by PyTorch in that
    dtype, plus a small slack for tensors whose error is at the rounding floor."""
    q, k, v, qb, kb, kw = case_inputs(c, dtype, device)
    _, lse0 = dsa.reference_attention(q, k, v, qb, kb, return_lse=True, **kw)
    do, dlse = upstream(c, dtype, lse0)
    (o_ref, lse_ref), g_ref = oracle(q, k, v, qb, kb, do, dlse, **kw)

    def in_dtype(q, k, v):
        return dsa.reference_attention(q, k, v, qb, kb, return_lse=True,
                                       compute_dtype=dtype, **kw)
    (o_pt, lse_pt), g_pt = grads(in_dtype, (q, k, v), (do, dlse), return_out=True)
    (o, lse), g = backend(q, k, v, qb, kb, do, dlse, **kw)
    assert o.dtype == dtype and all(x.dtype == dtype for x in g)
    slack = 1e-5
    pairs = [("o", o, o_pt, o_ref)] + [
        (n, a, p, e) for n, a, p, e in zip(("dq", "dk", "dv"), g, g_pt, g_ref)]
    fin = torch.isfinite(lse_ref)
    pairs.append(("lse", lse[fin], lse_pt[fin], lse_ref[fin]))
    assert torch.equal(torch.isinf(lse), ~fin)
    for name, a, p, e in pairs:
        assert torch.isfinite(a).all(), f"{name} has NaN/inf"
        err, err_pt = rel_err(a, e), rel_err(p, e)
        assert err <= 2 * err_pt + slack, \
            f"{name}: backend error {err:.3e} > 2 x PyTorch {dtype} error {err_pt:.3e} + {slack}"


# ------------------------------------------------------------------------- QK-sparse and hashing

@pytest.mark.parametrize("H,Hkv", [(2, 2), (4, 1)], ids=["mha", "mqa"])
def test_qk_sparse_matches_reference(device, H, Hkv, tiles):
    B, Nq, Nk, D = 2, 70, 90, 16
    q, k, v = to(device, *rand_qkv(B, Nq, Nk, H, Hkv, D))
    q_keep, k_keep = to(device, torch.rand(B, Nq, H) < 0.6, torch.rand(B, Nk, Hkv) < 0.4)
    qb, kb = keep_to_buckets(q_keep), keep_to_buckets(k_keep)
    assert torch.equal(qb, torch.where(q_keep, 0, -1))
    _, lse0 = dsa.reference_attention(q, k, v, qb, kb, return_lse=True)
    do, dlse = to(device, torch.randn(B, Nq, H, D), torch.randn(B, H, Nq))
    dlse = dlse.masked_fill(torch.isinf(lse0), 0.0)
    (o, lse), g = grads(lambda q, k, v: dsa.qk_sparse_attention(
        q, k, v, q_keep, k_keep, return_lse=True, backend="torch"), (q, k, v), (do, dlse),
        return_out=True)
    (o_ref, lse_ref), g_ref = oracle(q, k, v, qb, kb, do, dlse)
    assert_close_rel(o, o_ref, 1e-5, "o", atol=1e-5)
    assert_close_rel(lse, lse_ref, 1e-5, "lse", atol=1e-5)
    for name, a, e in zip(("dq", "dk", "dv"), g, g_ref):
        assert_close_rel(a, e, 1e-5, name, atol=1e-5)
    dropped = ~q_keep
    assert torch.equal(o[dropped], torch.zeros_like(o[dropped])), "dropped queries output 0"


@pytest.mark.parametrize("which", ["all", "queries", "keys"])
def test_qk_sparse_drop_everything(device, which, tiles):
    """All-False keeps: every output row is 0, lse -inf, gradients exactly 0, no NaN."""
    B, N, H, D = 2, 40, 2, 8
    q, k, v = to(device, *rand_qkv(B, N, N, H, H, D))
    q_keep = torch.ones(B, N, H, dtype=torch.bool, device=device)
    k_keep = torch.ones(B, N, H, dtype=torch.bool, device=device)
    if which in ("all", "queries"):
        q_keep[:] = False
    if which in ("all", "keys"):
        k_keep[:] = False
    (o, lse), g = grads(lambda q, k, v: dsa.qk_sparse_attention(
        q, k, v, q_keep, k_keep, return_lse=True, backend="torch"),
        (q, k, v), to(device, torch.randn(B, N, H, D), torch.randn(B, H, N)), return_out=True)
    assert torch.equal(o, torch.zeros_like(o))
    assert torch.isneginf(lse).all()
    for name, x in zip(("dq", "dk", "dv"), g):
        assert torch.equal(x, torch.zeros_like(x)), f"{name} must be exactly 0"


@pytest.mark.parametrize("causal,include_self", [(True, True), (True, False), (False, True)],
                         ids=["causal", "causal-noself", "noncausal"])
@pytest.mark.parametrize("H,Hkv", [(2, 2), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_hash_sparse_equals_bucketed(device, H, Hkv, causal, include_self):
    """hash_sparse_attention is bucketed_attention on lsh_buckets(q, group_size=H//Hkv) and
    lsh_buckets(k): bitwise equal outputs and gradients (same backend, same plan)."""
    B, Nq, Nk, D, n, seed = 2, 63, 80, 16, 4, 1234
    q, k, v = to(device, *rand_qkv(B, Nq, Nk, H, Hkv, D))
    do, dlse = to(device, torch.randn(B, Nq, H, D), torch.randn(B, H, Nq))
    kw = dict(causal=causal, include_self=include_self, return_lse=True, backend="torch")
    qb = dsa.lsh_buckets(q, n, seed=seed, group_size=H // Hkv)
    kb = dsa.lsh_buckets(k, n, seed=seed)
    _, lse0 = dsa.reference_attention(q, k, v, qb, kb, return_lse=True, causal=causal,
                                      include_self=include_self)
    dlse = dlse.masked_fill(torch.isinf(lse0), 0.0)
    (o_b, lse_b), g_b = grads(lambda q, k, v: dsa.bucketed_attention(q, k, v, qb, kb, **kw),
                              (q, k, v), (do, dlse), return_out=True)
    (o_h, lse_h), g_h = grads(lambda q, k, v: dsa.hash_sparse_attention(q, k, v, n, seed=seed,
                                                                        **kw),
                              (q, k, v), (do, dlse), return_out=True)
    assert torch.equal(o_h, o_b)
    assert torch.equal(lse_h, lse_b)
    for name, a, e in zip(("dq", "dk", "dv"), g_h, g_b):
        assert torch.equal(a, e), f"{name} differs"
    # and it is not trivially dense: different seeds give different outputs
    o_other = dsa.hash_sparse_attention(q, k, v, n, seed=seed + 1, backend="torch",
                                        causal=causal, include_self=include_self)
    assert not torch.equal(o_other, o_h)


def test_hash_sparse_matches_reference(device):
    B, N, H, Hkv, D, n = 2, 100, 4, 2, 16, 8
    q, k, v = to(device, *rand_qkv(B, N, N, H, Hkv, D, F64))
    o = dsa.hash_sparse_attention(q, k, v, n, seed=7, backend="torch")
    o_ref = dsa.reference_attention(q, k, v, dsa.lsh_buckets(q, n, seed=7, group_size=2),
                                    dsa.lsh_buckets(k, n, seed=7))
    assert_close_rel(o, o_ref, 1e-10, "o", atol=1e-10)


# ----------------------------------------------------------------------------- API details

def test_auto_is_torch_on_cpu():
    B, N, H, D = 2, 50, 2, 8
    q, k, v = rand_qkv(B, N, N, H, H, D)
    qb, kb = make_buckets("random4", B, N, H), make_buckets("random4", B, N, H)
    o_auto = dsa.bucketed_attention(q, k, v, qb, kb)
    o_torch = dsa.bucketed_attention(q, k, v, qb, kb, backend="torch")
    assert torch.equal(o_auto, o_torch)


def test_index_dtypes_and_noncontiguous_inputs():
    """int32/int16 buckets and positions and non-contiguous q, k, v give the same result."""
    B, N, H, D = 2, 45, 2, 8
    q, k, v = rand_qkv(B, N, N, H, H, D)
    qb, kb = make_buckets("dropped", B, N, H), make_buckets("dropped", B, N, H)
    qb, kb = qb.clamp(min=-1), kb.clamp(min=-1)
    pos = torch.randperm(N)
    o = dsa.bucketed_attention(q, k, v, qb, kb, q_positions=pos, k_positions=pos,
                               backend="torch")
    o_small = dsa.bucketed_attention(q, k, v, qb.int(), kb.short(), q_positions=pos.int(),
                                     k_positions=pos.short(), backend="torch")
    assert torch.equal(o, o_small)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)            # same values, other strides
    kt = k.permute(3, 0, 1, 2).contiguous().permute(1, 2, 3, 0)
    assert not qt.is_contiguous() and not kt.is_contiguous()
    o_nc = dsa.bucketed_attention(qt, kt, v, qb, kb, q_positions=pos, k_positions=pos,
                                  backend="torch")
    assert_close_rel(o_nc, o, 1e-6, "o (non-contiguous inputs)")


def test_inputs_not_modified():
    B, N, H, D = 2, 45, 2, 8
    q, k, v = rand_qkv(B, N, N, H, H, D, requires_grad=True)
    qb, kb = make_buckets("random4", B, N, H), make_buckets("random4", B, N, H)
    pos = torch.randperm(N)
    before = [x.detach().clone() for x in (q, k, v, qb, kb, pos)]
    o, lse = dsa.bucketed_attention(q, k, v, qb, kb, q_positions=pos, k_positions=pos,
                                    return_lse=True, backend="torch")
    (o.sum() + lse[torch.isfinite(lse)].sum()).backward()
    for name, a, b in zip(("q", "k", "v", "q_buckets", "k_buckets", "positions"),
                          (q, k, v, qb, kb, pos), before):
        assert torch.equal(a.detach(), b), f"{name} was modified"


# ----------------------------------------------------------------------------- sparse work

def _stats(N, n_buckets, *, causal=True, keep=None, B=1, H=1, D=16):
    """tile_stats of random buckets in [0, n_buckets), or of keep-masks (q_keep, k_keep)."""
    q = torch.randn(B, N, H, D)
    pos = normalize_positions("positions", None, B, N, q.device)
    if keep is None:
        qb = torch.randint(0, n_buckets, (B, N, H))
        kb = torch.randint(0, n_buckets, (B, N, H))
    else:
        qb, kb = keep_to_buckets(keep[0]), keep_to_buckets(keep[1])
    plan = make_plan(q, q, qb, kb, pos, pos, causal=causal, include_self=True,
                     softmax_scale=None)
    return tile_stats(plan)


def _keep_exactly(N, n_keep):
    """(1, N, 1) bool mask keeping n_keep random tokens."""
    keep = torch.zeros(N, dtype=torch.bool)
    keep[torch.randperm(N)[:n_keep]] = True
    return keep.view(1, N, 1)


def test_dense_live_tiles():
    """One bucket: causal visits the lower triangle of tiles (diagonal included),
    non-causal all of them."""
    N = 2048
    st = _stats(N, 1, B=2, H=2)
    nb = N // st["block"]
    assert st["all_tiles"] == 2 * 2 * nb * nb
    assert st["live_tiles"] == 2 * 2 * nb * (nb + 1) // 2
    assert _stats(N, 1, causal=False)["live_tiles"] == nb * nb


def test_live_tiles_fall_with_buckets():
    """More buckets, fewer live tiles; once buckets span several tiles the live
    fraction approaches 1 / n_buckets of dense causal."""
    live = [_stats(2048, n)["live_tiles"] for n in (1, 4, 16)]
    assert live[0] > live[1] > live[2], live
    assert live[2] < live[0] / 2, live
    # 16 buckets of ~512 tokens (4 tiles of 128): about 1/8 of the dense-causal tiles
    dense, sparse = _stats(8192, 1)["live_tiles"], _stats(8192, 16)["live_tiles"]
    assert sparse < dense / 4, (sparse, dense)


def test_dropped_tokens_are_compacted():
    """QK-sparse keeping 1/4 of the tokens visits only tiles of the kept tokens: with the
    same keep for q and k exactly the dense-causal tiles of N/4 tokens, with independent
    keeps at most all (N/4 / block)^2 of them."""
    N, kept = 2048, 512
    block = _stats(N, 1)["block"]
    nb = kept // block
    keep = _keep_exactly(N, kept)
    assert _stats(N, 1, keep=(keep, keep))["live_tiles"] == nb * (nb + 1) // 2
    independent = _stats(N, 1, keep=(_keep_exactly(N, kept), _keep_exactly(N, kept)))
    assert nb * (nb + 1) // 2 - nb <= independent["live_tiles"] <= nb * nb, independent


@pytest.mark.parametrize("include_self", [True, False], ids=["self", "noself"])
def test_int32_positions_at_dtype_limits(device, include_self):
    """int32 position tensors may hold -2**31 and 2**31 - 1; causality must stay exact."""
    B, N, H, D = 1, 6, 2, 8
    q, k, v = to(device, *rand_qkv(B, N, N, H, H, D))
    b = torch.zeros(B, N, H, dtype=torch.int64, device=device)
    pos = torch.tensor([-2 ** 31, -5, 0, 7, 2 ** 31 - 2, 2 ** 31 - 1], dtype=torch.int32)
    pos = pos[torch.randperm(N)].to(device)
    o = dsa.bucketed_attention(q, k, v, b, b, q_positions=pos, k_positions=pos,
                               include_self=include_self, backend="torch")
    o_ref = dsa.reference_attention(q.double(), k.double(), v.double(), b, b, q_positions=pos,
                                    k_positions=pos, include_self=include_self)
    assert_close_rel(o, o_ref, 1e-5, "o", atol=1e-6)


def test_dropped_tokens_values_never_reach_kept_ones(device):
    assert_dropped_values_unread(device, "torch")
