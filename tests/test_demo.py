"""``python -m dist_sparse_attn.demo``: its reference check fails on wrong results."""
from __future__ import annotations

import math

import pytest
import torch

import dist_sparse_attn as dsa
from dist_sparse_attn import demo


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_check_small_fails_on_non_finite_results(monkeypatch, bad):
    """A NaN (or inf) output of one entry point makes the check fail: Python's max()
    would otherwise drop a NaN error that comes after a finite one."""
    orig = dsa.qk_sparse_attention

    def broken(*args, **kwargs):
        o = orig(*args, **kwargs)
        return o + bad * o          # a non-finite output and gradients

    monkeypatch.setattr(dsa, "qk_sparse_attention", broken)
    worst = demo.check_small(torch.device("cpu"), "torch")
    assert not worst < 1e-4 and math.isinf(worst), worst


def test_check_small_passes_on_the_library():
    worst = demo.check_small(torch.device("cpu"), "torch")
    assert 0 <= worst < 1e-4, worst
