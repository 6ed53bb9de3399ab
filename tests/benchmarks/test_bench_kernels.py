"""bench_kernels' tile TFLOP/s: the FLOPs it credits the kernels with are those of the
tiles the forward kernel computes (checked on the CPU, the kernels under the
interpreter; the benchmark itself needs a GPU)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

from helpers import REPO, triton_runs_on

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import bench_kernels as BK  # noqa: E402

from dist_sparse_attn.kernels.triton_attn import forward_tiles, tile_fraction  # noqa: E402
from dist_sparse_attn.plan import make_plan  # noqa: E402


def test_tile_flops_formula():
    assert BK.tile_flops(10, 64, 32, 128, "fwd") == 10 * 4 * 64 * 32 * 128
    assert BK.tile_flops(10, 64, 32, 128, "fwd+bwd") == 3.5 * 10 * 4 * 64 * 32 * 128


@pytest.mark.skipif(not triton_runs_on("cpu"), reason="the block ranges run in Triton")
def test_dense_causal_tiles_are_the_causal_flops_plus_the_diagonal():
    """One bucket, causal: the live tiles are the lower triangle with its diagonal, so the
    credited FLOPs exceed the causal FLOPs only by the diagonal tiles' upper halves."""
    B, N, H, D = 1, 1024, 2, 16
    q = torch.randn(B, N, H, D)
    zeros = torch.zeros(B, N, H, dtype=torch.long)
    pos = torch.arange(N).expand(B, N)
    plan = make_plan(q, q, zeros, zeros, pos, pos, causal=True, include_self=True,
                     softmax_scale=None)
    bm, bn = forward_tiles(D, q.dtype)
    live = tile_fraction(plan, bm, bn)["live_tiles"]
    nq = N // bm
    assert bm == bn and live == B * H * nq * (nq + 1) // 2
    causal = BK._flops(B, H, N, D, "fwd")
    assert causal < BK.tile_flops(live, bm, bn, D, "fwd") <= causal * (1 + 1 / nq) + 1e-6


def test_rows_effective_tflops_and_speedup():
    """A row's effective TFLOP/s are dense causal FLOPs / time (hand-counted), its speed-up
    the flash time of the same mode / its time; the block-mask build (no attention) gets
    no TFLOP/s."""
    B, H, D, N = 2, 16, 64, 32768
    causal = 4 * B * H * N * N * D / 2                    # QK^T and PV, half the pairs
    r, line = BK.row(B, H, D, N, "ours kernel hash nb=16", "fwd+bwd", 4.0, "hash16", "card",
                     frac=0.04, base=52.0, tiles=(1000, 64, 64))
    assert r["eff_tflops"] == pytest.approx(3.5 * causal / 4e-3 / 1e12)
    assert r["speedup_vs_flash"] == 13.0
    assert r["tile_tflops"] == pytest.approx(3.5 * 1000 * 4 * 64 * 64 * D / 4e-3 / 1e12)
    assert f"{r['eff_tflops']:9.1f}" in line and "   13.00" in line
    r, line = BK.row(B, H, D, N, "flex mask build hash nb=16", "build", 35.0, "hash16", "card")
    assert r["eff_tflops"] is None and r["tile_tflops"] is None
    assert line.split()[-1] == "35.000", line
