"""Probe (GPU): is the Triton counting sort slower than torch.sort in a 16k step's attention?

Written when a 16k training A/B showed hash16 slower with the counting sort; on an
H100 (fourth session) this probe showed the opposite (17.7-20.2 vs 22.9-27.0 ms per
12 calls), and repeated training runs put the A/B down to host variance
(benchmarks/README.md, "Fourth session"). Times 12 back-to-back hash_sparse_attention forward+backward calls (one GPT-2-small
step's attention, B=1, N=16k, H=12, D=64, bf16, 16 buckets) with the counting sort
on and off (DSA_COUNTING_SORT), device time by CUDA events and host time by the
wall clock, then profiles one such "step" per mode (top kernels by CUDA time).
    python benchmarks/probes/sort_ab_probe.py
"""
import os
import time

import torch

import dist_sparse_attn as dsa


def step(q, k, v, nb):
    for _ in range(12):
        o = dsa.hash_sparse_attention(q, k, v, nb)
        o.float().sum().backward()


def main():
    torch.manual_seed(0)
    dev = "cuda"
    B, N, H, D, nb = 1, 16384, 12, 64, 16
    q, k, v = (torch.randn(B, N, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    for mode in ("1", "0", "1", "0"):
        os.environ["DSA_COUNTING_SORT"] = mode
        step(q, k, v, nb)
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        reps = 10
        t0 = time.perf_counter()
        e0.record()
        for _ in range(reps):
            step(q, k, v, nb)
        e1.record()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        print(f"counting_sort={mode}: device {e0.elapsed_time(e1) / reps:7.2f} ms/step, "
              f"host (enqueue) {(t1 - t0) * 1e3 / reps:7.2f} ms/step, "
              f"wall {(t2 - t0) * 1e3 / reps:7.2f} ms/step", flush=True)
    from torch.profiler import ProfilerActivity, profile
    for mode in ("1", "0"):
        os.environ["DSA_COUNTING_SORT"] = mode
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step(q, k, v, nb)
            torch.cuda.synchronize()
        print(f"\n## counting_sort={mode}")
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=18))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
