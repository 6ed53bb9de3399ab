"""benchmarks/bench_balance.py: one real CPU run (tiny model, a few steps) whose JSON holds
a row per bucket count and source, checked against the bound the bucket cap promises."""
from __future__ import annotations

import json
import os
import sys

import pytest

from helpers import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import bench_balance  # noqa: E402


@pytest.mark.timeout(300)
def test_bench_balance_smoke(tmp_path):
    """The balance benchmark runs end to end on the CPU (tiny model) and its JSON holds a
    row per bucket count and source, the cap never above its bound."""
    bench_balance.main(["--device", "cpu", "--small", "--steps", "4", "--out", str(tmp_path)])
    res = json.load(open(tmp_path / "balance.json"))
    assert {(r["n_buckets"], r["source"]) for r in res["rows"]} == {
        (nb, s) for nb in (4, 16, 64, 128) for s in ("trained", "gaussian")}
    for r in res["rows"]:
        # the cap bounds every bucket and never makes the largest one larger
        assert r["capped_max_over_mean"] <= min(res["cap"] + 1e-9, r["max_over_mean"])
        assert 0 < r["pairs_kept"] <= 1
