"""The sequence-parallel correctness check (``dist_sparse_attn.testing.check_parallel``,
whose command line is ``benchmarks/check_parallel_gpu.py``) launched with torchrun, as
users run it, and the package helpers behind it (``dist_sparse_attn.testing``) against
direct counts.

The check compares every rank's output and q/k/v gradient shards of each strategy
(bucket, ulysses, allgather) with the single-device op on rank 0, for every case (hash,
GQA, skewed, exclude-self, uneven shards, QK-sparse, dense), and exits 1 when one fails.

* GPU only (marked ``gpu``; at least 2 CUDA devices): N = 32768 in bf16 over NCCL, on 2
  GPUs and on all of them (at most 4).
* CPU: the same check on gloo with 2 processes at a small size, so its logic (sharding,
  gathering, comparison, report) is covered without GPUs, and a self-test: with
  ``--perturb`` (the last rank's output scaled by 1.1) it must fail, so a checker that
  only looked at rank 0's shard, or compared nothing, would not pass.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO

ROOT = Path(REPO)
SCRIPT = ROOT / "benchmarks" / "check_parallel_gpu.py"
N_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
CPU_ARGS = ["--device", "cpu", "--seqlen", "2048", "--heads", "4", "--dim", "16",
            "--gqa-kv-heads", "2", "--dtype", "bfloat16"]
CASES = 7                       # the script's cases
STRATEGIES = 3


def _launch(nproc, outdir, args, timeout_s):
    """torchrun the script; returns (exit code, output text, report or None)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(SCRIPT), "--out", str(outdir), *args]
    # a process group of its own: on a timeout the launcher and its workers die together
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} still running after {timeout_s} s:\n{out[-6000:]}")
    path = Path(outdir) / f"check_parallel_P{nproc}.json"
    report = json.loads(path.read_text()) if path.exists() else None
    return proc.returncode, out, report


def _check_report(rc, out, report, nproc):
    print(out)
    assert rc == 0, f"exit code {rc}:\n{out[-6000:]}"
    assert report is not None and report["meta"]["passed"], out[-6000:]
    rows = report["rows"]
    assert len(rows) == CASES * STRATEGIES
    assert {r["P"] for r in rows} == {nproc}
    assert all(r["status"] in ("pass", "skipped") for r in rows), out[-6000:]
    ran = [r for r in rows if r["status"] == "pass"]
    assert {r["strategy"] for r in ran} >= {"bucket", "allgather"}
    for r in ran:
        assert set(r["tensors"]) == {"o", "dq", "dk", "dv"}
        assert all(m["finite"] and m["pass"] for m in r["tensors"].values())
    uneven = [r for r in rows if r["case"].startswith("hash16-uneven")]
    assert uneven and all(len(set(r["shard_lengths"])) > 1 for r in uneven)
    skew = [r for r in rows if r["case"].startswith("hash16-skewed") and r["strategy"] == "bucket"]
    assert skew and all(len(r["cost_per_rank"]) == nproc for r in skew)
    return rows


# ---------------------------------------------------------------------------------------------
# GPU only: NCCL, bf16, N = 32768
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.timeout(600)
@pytest.mark.skipif(N_GPUS < 2, reason="needs at least 2 CUDA GPUs")
@pytest.mark.parametrize("gpus", ["2", "all"])
def test_check_parallel_nccl(gpus, tmp_path):
    nproc = 2 if gpus == "2" else min(N_GPUS, 4)
    if gpus == "all" and nproc == 2:
        pytest.skip("2 GPUs: the 2-GPU run covers it")
    rc, out, report = _launch(nproc, tmp_path, ["--seqlen", "32768"], timeout_s=540)
    rows = _check_report(rc, out, report, nproc)
    assert all(r["N"] >= 32760 and r["dtype"] == "bfloat16" for r in rows)
    assert report["meta"]["backend_dist"] == "nccl"


# ---------------------------------------------------------------------------------------------
# CPU: gloo, small
# ---------------------------------------------------------------------------------------------

@pytest.mark.timeout(300)
def test_check_parallel_gloo(tmp_path):
    rc, out, report = _launch(2, tmp_path, CPU_ARGS, timeout_s=240)
    rows = _check_report(rc, out, report, 2)
    assert all(r["status"] == "pass" for r in rows)          # H=4, Hkv=2, 4: ulysses runs
    assert report["meta"]["backend_dist"] == "gloo"
    # the bf16 runs were also compared with a float32 run
    assert report["meta"]["high_precision"] == "float32"
    assert all("rel_par_hi" in r["tensors"]["dk"] for r in rows)


@pytest.mark.timeout(300)
def test_check_parallel_gloo_detects_errors(tmp_path):
    """The last rank's output scaled by 1.1: every run must fail, the exit code is 1."""
    args = ["--device", "cpu", "--seqlen", "1024", "--heads", "4", "--dim", "16",
            "--gqa-kv-heads", "2", "--cases", "hash16-uneven", "qk80", "--perturb", "0.1"]
    rc, out, report = _launch(2, tmp_path, args, timeout_s=240)
    assert rc != 0, out[-6000:]
    assert report is not None and not report["meta"]["passed"]
    rows = report["rows"]
    assert len(rows) == 2 * STRATEGIES
    assert all(r["status"] == "fail" and not r["tensors"]["o"]["pass"] for r in rows), out


# ---------------------------------------------------------------------------------------------
# the package's helpers behind the checker and the benchmarks
# ---------------------------------------------------------------------------------------------

def test_bucket_costs_against_a_direct_count(seed):
    """bucket_costs: every routed group's n_q * n_k counted once, on the rank the LPT
    assignment gives it (within the largest group of the mean)."""
    from dist_sparse_attn.testing import bucket_costs
    g = torch.Generator().manual_seed(seed)
    B, N, H, Hkv, nb, P = 2, 300, 4, 2, 5, 3
    qb = torch.randint(-1, nb, (B, N, H), generator=g)
    kb = torch.randint(-1, nb, (B, N, Hkv), generator=g)
    kb[1, :, 1] = torch.where(kb[1, :, 1] == 2, 3, kb[1, :, 1])   # a group without keys
    costs = bucket_costs(qb, kb, P)
    per_group = [int((qb[b, :, j * 2:(j + 1) * 2] == u).sum() * (kb[b, :, j] == u).sum())
                 for b in range(B) for j in range(Hkv) for u in range(nb)]
    assert len(costs) == P and sum(costs) == sum(per_group)
    assert max(costs) - sum(per_group) / P <= max(per_group)
    assert bucket_costs(qb * 0 - 1, kb, P) == [0.0] * P


def test_local_attention_ms_reads_the_profiler_ranges():
    """local_attention_ms counts the strategies' local attention range (forward) and the
    attention's autograd backward, and nothing outside them."""
    from torch.profiler import profile

    import dist_sparse_attn as dsa
    from dist_sparse_attn.parallel._comm import local_attention_range
    from dist_sparse_attn.testing import local_attention_ms
    q, k, v = (torch.randn(1, 200, 2, 16, requires_grad=True) for _ in range(3))
    b = torch.randint(0, 3, (1, 200, 2))
    with profile() as prof:
        with local_attention_range():
            o = dsa.bucketed_attention(q, k, v, b, b, backend="torch")
        o.sum().backward()
    fwd = local_attention_ms(prof, cuda=False, backward=False)
    both = local_attention_ms(prof, cuda=False)
    assert 0 < fwd < both
    with profile() as bare:                 # the same call outside the range: forward 0
        dsa.bucketed_attention(q, k, v, b, b, backend="torch").sum().backward()
    assert local_attention_ms(bare, cuda=False, backward=False) == 0
    assert local_attention_ms(bare, cuda=False) > 0


@pytest.mark.parametrize("arg", [["--heads", "0"], ["--heads", "-4"], ["--gqa-kv-heads", "0"],
                                 ["--threads", "0"], ["--timeout", "0"], ["--batch", "0"],
                                 ["--dim", "0"], ["--buckets", "3"], ["--seqlen", "4"],
                                 ["--overlap-chunks", "0"], ["--heads", "x"]])
def test_checker_refuses_bad_arguments(arg, capsys):
    """A bad argument is a usage error (exit 2, one line naming it), not a traceback with
    the exit code of a failed check."""
    from dist_sparse_attn.testing.check_parallel import parse_args
    with pytest.raises(SystemExit) as e:
        parse_args(["--out", "/tmp/unused", *arg])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert arg[0] in err[-1], err
