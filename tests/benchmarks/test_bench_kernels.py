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
