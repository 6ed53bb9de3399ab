"""benchmarks/bench_hf.py --cpu-smoke: every implementation (sdpa, hash-local, qk) and the
quality mode run at tiny sizes, and the JSON holds a row per implementation and length
and a finite loss curve per quality run."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import REPO

pytest.importorskip("transformers")


@pytest.mark.timeout(120)
def test_bench_hf_cpu_smoke(tmp_path):
    """benchmarks/bench_hf.py --cpu-smoke runs every implementation and the quality mode
    at tiny sizes and writes its JSON."""
    out = tmp_path / "bench.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "bench_hf.py"),
                        "--cpu-smoke", "--out", str(out)], capture_output=True, text=True,
                       timeout=110, env=env, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    speed = res["speed"]
    assert {(row["impl"], row["seq_len"]) for row in speed} == \
        {(i, n) for i in ("sdpa", "hash-local", "qk") for n in res["config"]["seq_lens"]}
    for row in speed:
        assert row["status"] == "ok", row
        assert row["tokens_per_s"] > 0 and len(row["step_s"]) == res["config"]["steps"]
    curves = res["quality"]["curves"]
    assert set(curves) == {"sdpa", "hash-local"}
    for c in curves.values():
        assert len(c["loss"]) == res["quality"]["steps"] and all(map(lambda v: v == v, c["loss"]))
