"""benchmarks/bench_balance.py: how the per-layer statistics become one row per bucket
count (checked with fixed per-layer numbers, no training)."""
from __future__ import annotations

import json
import os
import sys

import torch

from helpers import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import bench_balance  # noqa: E402


def test_rows_take_the_max_of_maxima_and_the_mean_of_means(tmp_path, monkeypatch):
    """'max_over_mean' is the fullest bucket of any head of any layer (max over layers);
    'mean_max_over_mean' is the mean over all LSH heads of their fullest / mean: every
    layer has the same heads, so the mean of the layers' means, not their max."""
    per_layer = [dict(max_over_mean=9.0, mean_max_over_mean=6.0, capped_max_over_mean=4.0,
                      pairs_kept=0.5),
                 dict(max_over_mean=3.0, mean_max_over_mean=2.0, capped_max_over_mean=3.0,
                      pairs_kept=1.0)]
    calls = []

    def fake_stats(q, k, nb, seed, lsh_heads, cap):
        calls.append(seed)
        return dict(per_layer[(len(calls) - 1) % 2])        # layer 0, layer 1, layer 0, ...

    q = torch.zeros(1, 8, 4, 16)
    monkeypatch.setattr(bench_balance, "train", lambda *a, **kw: (None, None, [1.0]))
    monkeypatch.setattr(bench_balance, "capture_qk", lambda model, x: [(q, q), (q, q)])
    monkeypatch.setattr(bench_balance, "stats", fake_stats)
    bench_balance.main(["--device", "cpu", "--small", "--buckets", "16", "--out", str(tmp_path)])
    rows = json.load(open(tmp_path / "balance.json"))["rows"]
    assert [(r["n_buckets"], r["source"]) for r in rows] == [(4, "trained"), (4, "gaussian"),
                                                             (16, "trained"), (16, "gaussian"),
                                                             (64, "trained"), (64, "gaussian"),
                                                             (128, "trained"), (128, "gaussian")]
    for r in rows:
        assert r["max_over_mean"] == 9.0
        assert r["capped_max_over_mean"] == 4.0
        assert r["mean_max_over_mean"] == 4.0          # (6 + 2) / 2, not max(6, 2)
        assert r["pairs_kept"] == 0.75
