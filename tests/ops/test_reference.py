"""The oracle ``reference_attention`` against independently built attention
(docs/design.md, section 1).

Independent references: ``scaled_dot_product_attention`` in float64 with a
boolean mask built here from the buckets and positions (GQA by
``repeat_interleave`` of the kv heads), and a per-row Python loop for tiny
sizes. SDPA returns NaN for rows with no allowed key, so those rows are
checked separately against the contract (o = 0, lse = -inf, zero gradients).
"""
import math

import pytest
import torch
import torch.nn.functional as F

import dist_sparse_attn as dsa
from helpers import assert_close_rel, grads, rand_qkv

F64 = torch.float64


def build_mask(qb, kb, qpos, kpos, *, causal, include_self, group):
    """Allowed (B, H, Nq, Nk) from buckets (B, N, heads) and positions (B, N), written from §1."""
    B, Nq, H = qb.shape
    Nk = kb.shape[1]
    kb_h = kb[:, :, torch.arange(H) // group]                        # (B, Nk, H): kv head of q head
    same = qb.permute(0, 2, 1)[:, :, :, None] == kb_h.permute(0, 2, 1)[:, :, None, :]
    ok = same & (qb.permute(0, 2, 1) >= 0)[:, :, :, None]            # (B, H, Nq, Nk)
    if causal:
        qp = qpos.reshape(B, 1, Nq, 1)
        kp = kpos.reshape(B, 1, 1, Nk)
        ok = ok & ((kp <= qp) if include_self else (kp < qp))
    return ok


def sdpa_masked(q, k, v, mask, scale):
    """float64 SDPA with a boolean mask; q (B, Nq, H, D), k/v (B, Nk, Hkv, D) -> (B, Nq, H, D)."""
    g = q.shape[2] // k.shape[2]
    qh = q.double().transpose(1, 2)                                  # (B, H, Nq, D)
    kh = k.double().transpose(1, 2).repeat_interleave(g, 1)          # (B, H, Nk, D)
    vh = v.double().transpose(1, 2).repeat_interleave(g, 1)
    return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale).transpose(1, 2)


def masked_lse(q, k, mask, scale):
    """logsumexp of the allowed scores, (B, H, Nq) float64 (-inf for empty rows)."""
    g = q.shape[2] // k.shape[2]
    qh = q.double().transpose(1, 2)
    kh = k.double().transpose(1, 2).repeat_interleave(g, 1)
    s = (qh @ kh.transpose(-1, -2)) * scale
    return s.masked_fill(~mask, float("-inf")).logsumexp(-1)


def full_positions(pos, B, N):
    if pos is None:
        return torch.arange(N).expand(B, N)
    return pos.expand(B, N) if pos.dim() == 1 else pos


def random_buckets(B, N, heads, n, p_drop=0.0):
    b = torch.randint(0, n, (B, N, heads))
    if p_drop:
        b = torch.where(torch.rand(B, N, heads) < p_drop, -torch.randint(1, 5, b.shape), b)
    return b


# ----------------------------------------------------------------------------- dense special case

@pytest.mark.parametrize("Nq,Nk,H,Hkv", [
    (1, 1, 2, 2), (7, 7, 2, 2), (63, 63, 2, 2), (63, 100, 2, 2), (100, 63, 2, 2),
    (33, 33, 4, 2), (33, 40, 4, 1),
], ids=["n1", "n7", "n63", "nq63-nk100", "nq100-nk63", "gqa-h4-kv2", "mqa-h4-kv1"])
def test_dense_equals_sdpa_is_causal(Nq, Nk, H, Hkv):
    """All buckets 0 is dense causal attention: SDPA(is_causal=True), top-left aligned."""
    B, D = 2, 16
    q, k, v = rand_qkv(B, Nq, Nk, H, Hkv, D, F64)
    qb = torch.zeros(B, Nq, H, dtype=torch.int64)
    kb = torch.zeros(B, Nk, Hkv, dtype=torch.int64)
    do = torch.randn(B, Nq, H, D, dtype=F64)

    def ours(q, k, v):
        return dsa.reference_attention(q, k, v, qb, kb)

    def sdpa(q, k, v):
        g = H // Hkv
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(g, 1),
            v.transpose(1, 2).repeat_interleave(g, 1), is_causal=True)
        return o.transpose(1, 2)

    o, g = grads(ours, (q, k, v), do, return_out=True)
    o_ref, g_ref = grads(sdpa, (q, k, v), do, return_out=True)
    assert_close_rel(o, o_ref, 1e-12, "o")
    for name, a, e in zip("qkv", g, g_ref):
        assert_close_rel(a, e, 1e-12, f"d{name}", atol=1e-12)


# ----------------------------------------------------------------------------- general masks

POSITIONS = {
    "default": lambda B, N: None,
    "perm-N": lambda B, N: torch.randperm(N),
    "perm-BN": lambda B, N: torch.stack([torch.randperm(N) for _ in range(B)]),
    "dup-negative": lambda B, N: torch.randint(-20, 20, (B, N)),
}


@pytest.mark.parametrize("positions", list(POSITIONS), ids=list(POSITIONS))
@pytest.mark.parametrize("causal,include_self", [(True, True), (True, False), (False, True)],
                         ids=["causal", "causal-noself", "noncausal"])
@pytest.mark.parametrize("H,Hkv", [(2, 2), (4, 2), (3, 1)], ids=["mha", "gqa", "mqa"])
def test_matches_masked_sdpa(positions, causal, include_self, H, Hkv):
    """o matches SDPA with the §1 mask on non-empty rows; lse is the allowed logsumexp."""
    B, Nq, Nk, D = 2, 37, 45, 8
    q, k, v = rand_qkv(B, Nq, Nk, H, Hkv, D, F64)
    qb = random_buckets(B, Nq, H, 3, p_drop=0.2)
    kb = random_buckets(B, Nk, Hkv, 3, p_drop=0.2)
    qpos = POSITIONS[positions](B, Nq)
    kpos = POSITIONS[positions](B, Nk)
    scale = 0.37
    o, lse = dsa.reference_attention(q, k, v, qb, kb, q_positions=qpos, k_positions=kpos,
                                     causal=causal, include_self=include_self,
                                     softmax_scale=scale, return_lse=True)
    mask = build_mask(qb, kb, full_positions(qpos, B, Nq), full_positions(kpos, B, Nk),
                      causal=causal, include_self=include_self, group=H // Hkv)
    o_ref = sdpa_masked(q, k, v, mask, scale)                        # NaN on empty rows
    live = mask.any(-1).transpose(1, 2)                              # (B, Nq, H)
    assert live.any() and (~live).any(), "test inputs should mix empty and non-empty rows"
    assert_close_rel(o[live], o_ref[live], 1e-12, "o (non-empty rows)")
    assert torch.equal(o[~live], torch.zeros_like(o[~live])), "empty rows must output exactly 0"
    assert lse.dtype == torch.float32
    assert_close_rel(lse, masked_lse(q, k, mask, scale).float(), 1e-6, "lse")
    assert torch.equal(torch.isinf(lse), ~live.transpose(1, 2)), "lse = -inf exactly on empty rows"


def test_default_scale_is_inv_sqrt_d():
    B, N, H, D = 1, 20, 2, 12
    q, k, v = rand_qkv(B, N, N, H, H, D, F64)
    b = random_buckets(B, N, H, 2)
    o = dsa.reference_attention(q, k, v, b, b)
    o_ref = dsa.reference_attention(q, k, v, b, b, softmax_scale=1 / math.sqrt(D))
    assert_close_rel(o, o_ref, 1e-14, "o with scale 1/sqrt(D)")
    o_other = dsa.reference_attention(q, k, v, b, b, softmax_scale=1.0)
    assert not torch.allclose(o, o_other)


def test_positions_shapes_agree():
    """Positions of shape (N,) mean the same positions in every batch as (B, N)."""
    B, N, H, D = 3, 30, 2, 8
    q, k, v = rand_qkv(B, N, N, H, H, D, F64)
    b = random_buckets(B, N, H, 2)
    pos = torch.randperm(N)
    o1 = dsa.reference_attention(q, k, v, b, b, q_positions=pos, k_positions=pos)
    o2 = dsa.reference_attention(q, k, v, b, b, q_positions=pos.expand(B, N).clone(),
                                 k_positions=pos.expand(B, N).clone())
    assert torch.equal(o1, o2)


def test_permuting_tokens_with_positions_is_equivariant():
    """Shuffling the tokens and passing their original positions shuffles the output."""
    B, N, H, D = 2, 41, 2, 8
    q, k, v = rand_qkv(B, N, N, H, H, D, F64)
    qb, kb = random_buckets(B, N, H, 3), random_buckets(B, N, H, 3)
    o = dsa.reference_attention(q, k, v, qb, kb)
    perm = torch.randperm(N)
    o_p = dsa.reference_attention(q[:, perm], k[:, perm], v[:, perm], qb[:, perm], kb[:, perm],
                                  q_positions=perm, k_positions=perm)
    assert_close_rel(o_p, o[:, perm], 1e-13, "o of permuted tokens")


def loop_attention(q, k, v, qb, kb, qpos, kpos, *, causal, include_self, scale):
    """Row-by-row §1, for tiny inputs: o (B, Nq, H, D), lse (B, H, Nq) in float64."""
    B, Nq, H, D = q.shape
    Nk, Hkv = k.shape[1], k.shape[2]
    o = torch.zeros(B, Nq, H, D, dtype=F64)
    lse = torch.full((B, H, Nq), float("-inf"), dtype=F64)
    for b in range(B):
        for h in range(H):
            hk = h // (H // Hkv)
            for i in range(Nq):
                js = [j for j in range(Nk)
                      if qb[b, i, h] >= 0 and qb[b, i, h] == kb[b, j, hk]
                      and (not causal or (kpos[b, j] <= qpos[b, i] if include_self
                                          else kpos[b, j] < qpos[b, i]))]
                if not js:
                    continue
                s = torch.stack([q[b, i, h].double() @ k[b, j, hk].double() for j in js]) * scale
                p = torch.softmax(s, 0)
                o[b, i, h] = sum(p[t] * v[b, j, hk].double() for t, j in enumerate(js))
                lse[b, h, i] = torch.logsumexp(s, 0)
    return o, lse


@pytest.mark.parametrize("causal,include_self", [(True, True), (True, False), (False, True)],
                         ids=["causal", "causal-noself", "noncausal"])
def test_matches_row_loop(causal, include_self):
    B, Nq, Nk, H, Hkv, D = 2, 9, 11, 4, 2, 5
    q, k, v = rand_qkv(B, Nq, Nk, H, Hkv, D, F64)
    qb = random_buckets(B, Nq, H, 2, p_drop=0.2)
    kb = random_buckets(B, Nk, Hkv, 2, p_drop=0.2)
    qpos = torch.stack([torch.randperm(Nq) for _ in range(B)])
    kpos = torch.randint(-2, Nq + 2, (B, Nk))
    o, lse = dsa.reference_attention(q, k, v, qb, kb, q_positions=qpos, k_positions=kpos,
                                     causal=causal, include_self=include_self,
                                     softmax_scale=0.7, return_lse=True)
    o_ref, lse_ref = loop_attention(q, k, v, qb, kb, qpos, kpos, causal=causal,
                                    include_self=include_self, scale=0.7)
    assert_close_rel(o, o_ref, 1e-12, "o")
    assert_close_rel(lse, lse_ref.float(), 1e-6, "lse")


# ----------------------------------------------------------------------------- empty rows

def test_empty_rows_zero_output_and_gradients():
    """Rows with no allowed key: o = 0, lse = -inf, no NaN anywhere, zero gradients,
    also when the upstream gradient of lse is non-zero on those rows."""
    B, N, H, D = 2, 16, 2, 8
    q, k, v = rand_qkv(B, N, N, H, H, D, F64)
    qb = random_buckets(B, N, H, 2, p_drop=0.3)
    kb = random_buckets(B, N, H, 2, p_drop=0.3)
    qb[:, 0] = 0                                 # position 0 without self: always empty
    do = torch.randn(B, N, H, D, dtype=F64)
    dlse = torch.randn(B, H, N, dtype=torch.float32)

    def f(q, k, v):
        return dsa.reference_attention(q, k, v, qb, kb, include_self=False, return_lse=True)

    (o, lse), (dq, dk, dv) = grads(f, (q, k, v), (do, dlse), return_out=True)
    empty = torch.isinf(lse)                                         # (B, H, N)
    assert empty[:, :, 0].all() and (~empty).any()
    assert (lse[empty] < 0).all(), "empty rows have lse = -inf"
    assert torch.isfinite(lse[~empty]).all()
    e_rows = empty.transpose(1, 2)                                   # (B, N, H)
    assert torch.equal(o[e_rows], torch.zeros_like(o[e_rows]))
    for name, g in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(g).all(), f"{name} has NaN/inf"
    assert torch.equal(dq[e_rows], torch.zeros_like(dq[e_rows])), "empty query rows get dq = 0"
    # keys that no query may attend get no gradient
    mask = build_mask(qb, kb, full_positions(None, B, N), full_positions(None, B, N),
                      causal=True, include_self=False, group=1)
    unused = ~mask.any(2).transpose(1, 2)                            # (B, N, Hkv)
    assert unused.any()
    assert torch.equal(dk[unused], torch.zeros_like(dk[unused]))
    assert torch.equal(dv[unused], torch.zeros_like(dv[unused]))


def test_all_dropped_is_zero():
    B, N, H, D = 1, 10, 2, 4
    q, k, v = rand_qkv(B, N, N, H, H, D, F64)
    b = torch.full((B, N, H), -1)
    do = torch.randn(B, N, H, D, dtype=F64)
    (o, lse), g = grads(lambda q, k, v: dsa.reference_attention(q, k, v, b, b, return_lse=True),
                        (q, k, v), (do, torch.randn(B, H, N)), return_out=True)
    assert torch.equal(o, torch.zeros_like(o))
    assert torch.isneginf(lse).all()
    for x in g:
        assert torch.equal(x, torch.zeros_like(x))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_gradcheck(causal):
    """Autograd gradients of the oracle agree with finite differences (empty rows included)."""
    B, Nq, Nk, H, Hkv, D = 1, 6, 7, 2, 1, 3
    q, k, v = rand_qkv(B, Nq, Nk, H, Hkv, D, F64, requires_grad=True)
    qb = random_buckets(B, Nq, H, 2, p_drop=0.2)
    kb = random_buckets(B, Nk, Hkv, 2, p_drop=0.2)

    def f(q, k, v):
        return dsa.reference_attention(q, k, v, qb, kb, causal=causal, include_self=False)

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_lse_gradient():
    """The gradient through lse (float32 by contract, so no finite differences) equals
    the float64 autograd gradient of the masked logsumexp."""
    B, Nq, Nk, H, Hkv, D = 2, 13, 17, 4, 2, 8
    q, k, v = rand_qkv(B, Nq, Nk, H, Hkv, D, F64)
    qb = random_buckets(B, Nq, H, 2, p_drop=0.2)
    kb = random_buckets(B, Nk, Hkv, 2, p_drop=0.2)
    mask = build_mask(qb, kb, full_positions(None, B, Nq), full_positions(None, B, Nk),
                      causal=True, include_self=True, group=H // Hkv)
    dlse = torch.randn(B, H, Nq).double()            # float32 values: lse is float32
    dlse = dlse.masked_fill(~mask.any(-1), 0.0)      # the -inf rows of the test-side lse
    g = grads(lambda q, k, v: dsa.reference_attention(q, k, v, qb, kb, return_lse=True)[1],
              (q, k, v), dlse)
    g_ref = grads(lambda q, k, v: masked_lse(q, k, mask, D ** -0.5) + 0 * v.sum(),
                  (q, k, v), dlse)
    for name, a, e in zip("qkv", g, g_ref):
        assert_close_rel(a, e, 1e-12, f"d{name}", atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32],
                         ids=["fp16", "bf16", "fp32"])
def test_output_dtypes(dtype):
    B, N, H, D = 1, 8, 2, 4
    q, k, v = rand_qkv(B, N, N, H, H, D, dtype)
    b = torch.zeros(B, N, H, dtype=torch.int64)
    o, lse = dsa.reference_attention(q, k, v, b, b, return_lse=True)
    assert o.dtype == dtype and lse.dtype == torch.float32
    assert o.shape == q.shape and lse.shape == (B, H, N)
