"""Packed variable-length input (``bucketed_attention_varlen``): equal to the float64
oracle ``reference_attention`` on each segment on its own, with both backends (Triton:
on the CPU under the interpreter, and on a CUDA GPU)."""
import pytest
import torch

import dist_sparse_attn as dsa
from helpers import assert_close_rel, triton_runs_on


def _segments(lengths):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return cu


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("lengths", [[5, 40, 1, 77], [63], [0, 30, 0, 20]], ids=str)
def test_varlen_equals_per_segment(device, backend, lengths):
    if backend == "triton" and not triton_runs_on(device):
        pytest.skip("Triton runs on CPU tensors only under TRITON_INTERPRET=1")
    H, Hkv, D, nb = 4, 2, 16, 3
    cu = _segments(lengths).to(device)
    T = int(cu[-1])
    q = torch.randn(T, H, D, device=device, requires_grad=True)
    k = torch.randn(T, Hkv, D, device=device, requires_grad=True)
    v = torch.randn(T, Hkv, D, device=device, requires_grad=True)
    qb = torch.randint(-1, nb, (T, H), device=device)
    kb = torch.randint(-1, nb, (T, Hkv), device=device)
    o, lse = dsa.bucketed_attention_varlen(q, k, v, qb, kb, cu, cu, return_lse=True,
                                           backend=backend)
    g = torch.randn_like(o)
    dq, dk, dv = torch.autograd.grad((o * g).sum(), (q, k, v))
    for s in range(len(lengths)):
        a, b = int(cu[s]), int(cu[s + 1])
        if a == b:
            continue
        qs, ks, vs = (x.detach()[a:b].double().requires_grad_() for x in (q, k, v))
        ro, rlse = dsa.reference_attention(qs[None], ks[None], vs[None], qb[None, a:b],
                                           kb[None, a:b], return_lse=True)
        assert_close_rel(o[a:b], ro[0], 1e-5, f"o seg {s}", atol=1e-6)
        assert torch.equal(torch.isinf(lse[:, a:b]), torch.isinf(rlse[0]))
        rq, rk, rv = torch.autograd.grad((ro[0] * g[a:b].double()).sum(), (qs, ks, vs))
        # atol scaled to the segment: a gradient can be exactly 0 analytically
        # (a row whose only key is itself), leaving float32 rounding residue
        for name, x, y in (("dq", dq[a:b], rq), ("dk", dk[a:b], rk), ("dv", dv[a:b], rv)):
            assert_close_rel(x, y, 1e-5, f"{name} seg {s}", atol=1e-5 * (b - a) ** 0.5)


def test_varlen_explicit_positions_and_errors():
    q = torch.randn(10, 2, 8)
    b = torch.zeros(10, 2, dtype=torch.long)
    cu = torch.tensor([0, 4, 10])
    pos = torch.tensor([3, 2, 1, 0, 9, 8, 7, 6, 5, 4])
    o = dsa.bucketed_attention_varlen(q, q, q, b, b, cu, cu, q_positions=pos, k_positions=pos)
    ro = dsa.reference_attention(q[None, :4], q[None, :4], q[None, :4], b[None, :4],
                                 b[None, :4], q_positions=pos[:4], k_positions=pos[:4])
    assert_close_rel(o[:4], ro[0], 1e-5, "o", atol=1e-6)
    with pytest.raises(ValueError, match="cu_seqlens_q must start at 0"):
        dsa.bucketed_attention_varlen(q, q, q, b, b, torch.tensor([1, 10]), cu)
    with pytest.raises(ValueError, match="same number of segments"):
        dsa.bucketed_attention_varlen(q, q, q, b, b, cu, torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="cu_seqlens_k must be a 1-D integer"):
        dsa.bucketed_attention_varlen(q, q, q, b, b, cu, cu.float())
    with pytest.raises(ValueError, match="q must be a 3-D"):
        dsa.bucketed_attention_varlen(q[None], q, q, b, b, cu, cu)
