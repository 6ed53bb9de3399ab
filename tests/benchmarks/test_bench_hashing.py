"""benchmarks/bench_hashing.py: one real CPU run at tiny sizes (a few seconds) whose JSON
and table hold every measurement the script reports, and its helpers against direct
counts."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import bench_hashing as BH  # noqa: E402


@pytest.mark.timeout(120)
def test_cpu_small_smoke(tmp_path):
    out = tmp_path / "hashing.json"
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "bench_hashing.py"), "--device",
           "cpu", "--small", "--out", str(out)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=110)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert [x["N"] for x in rows] == [2048, 4096]
    assert [x["n_buckets"] for x in rows] == [128, 256]
    assert [x["factors"] for x in rows] == [[8, 16], [16, 16]]
    for x in rows:
        for key in ("hash_ms", "attn_ms", "whole_ms", "classic_hash_ms"):
            assert x[key] > 0, key
        assert x["hash_share"] == x["hash_ms"] / x["whole_ms"]      # (CPU timings are noisy)
        # the table's row prints the balance measurements of the JSON
        row = [line for line in r.stdout.splitlines()
               if line.split()[:2] == [str(x["N"]), str(x["n_buckets"])]]
        assert len(row) == 1, r.stdout
        assert f" {x['max_mean']:8.2f} |" in row[0], (x, row[0])
        assert row[0].endswith(f" {x['classic_max_mean']:8.2f}"), (x, row[0])
    assert rows[1]["hash_growth"] == rows[1]["hash_ms"] / rows[0]["hash_ms"]
    assert "classic ms" in r.stdout and "16x16" in r.stdout


def test_cuda_without_gpu_exits_2(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert BH.main(["--out", str(tmp_path / "x.json")]) == 2
    assert not (tmp_path / "x.json").exists()


def test_max_over_mean_and_classic_buckets():
    b = torch.tensor([[[0, 1], [0, 1], [0, 0], [3, 1]]])           # (B=1, N=4, H=2)
    # head 0: bucket 0 holds 3 of 4 tokens; mean over 4 buckets is 1 token
    assert BH.max_over_mean(b, 4) == 3.0
    x = torch.randn(1, 37, 2, 8)
    want = torch.stack([torch.cat([p, -p], -1).argmax(-1) for p in [
        torch.einsum("bnd,dc->bnc", x[:, :, h].double(),
                     torch.randn(2, 8, 6, generator=torch.Generator().manual_seed(4))[h].double())
        for h in range(2)]], -1)
    got = BH.classic_buckets(x, 12, seed=4)
    assert (got == want).float().mean() > 0.97
    # n_buckets <= 64: the classic scheme is the library's
    assert torch.equal(BH.classic_buckets(x, 12, seed=4), __import__("dist_sparse_attn")
                       .lsh_buckets(x, 12, seed=4))


def test_classic_timing_excludes_drawing_the_rotation(monkeypatch):
    """The classic scheme is timed on its hashing alone, like the library's lsh_buckets
    (whose rotations are drawn once and cached on the device): the timed call draws no
    random rotation on the CPU and copies none to the device."""
    import argparse
    drawn = []

    def fake_bench(fn, device, reps, grad_to_none=None):
        orig, n = torch.randn, [0]

        def counting(*a, **kw):
            n[0] += 1
            return orig(*a, **kw)
        monkeypatch.setattr(torch, "randn", counting)
        try:
            fn()
        finally:
            monkeypatch.setattr(torch, "randn", orig)
        drawn.append(n[0])
        return 1.0
    monkeypatch.setattr(BH, "_bench", fake_bench)
    args = argparse.Namespace(tokens_per_bucket=16, heads=2, kv_heads=2, dim=16, reps=1,
                              classic_max_n=10 ** 9)
    row = BH.measure(512, args, torch.device("cpu"), torch.float32)
    assert row["n_buckets"] == 32 and "classic_hash_ms" in row and len(drawn) == 4
    assert drawn[-1] == 0, drawn
    # the rotation drawn outside the timing is the one the classic scheme always used
    x = torch.randn(1, 64, 2, 16)
    assert torch.equal(BH.classic_buckets(x, 12, seed=4),
                       BH.classic_buckets(x, 12, rot=BH.classic_rotation(2, 16, 12, seed=4)))
