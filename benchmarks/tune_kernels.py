"""Sweep tile shapes / warps / stages of the three Triton kernels on one GPU.

The launchers take the tile choice as an argument (``triton_forward(..., tiles=)``,
``triton_backward(..., dkdv_tiles=, dq_tiles=)``); the library's choice lives in
``kernels/triton_attn.py::_config``.

Times the forward and the backward (dK/dV kernel and dQ kernel, one varied at
a time) at bf16, B=2, H=16 for the given head dim, on a hash-sparse and a
dense (one bucket) case, and prints the best configuration of each kernel.
Also profiles one end-to-end hash-sparse call to show where the non-kernel
time goes.

    python benchmarks/tune_kernels.py --dim 64 --n 16384
"""
import argparse
import json
import os

import torch
from triton.testing import do_bench

import dist_sparse_attn as dsa
from dist_sparse_attn.kernels import triton_attn as ta
from dist_sparse_attn.plan import make_plan

CANDIDATES = {
    "fwd": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3),
            (128, 32, 4, 3), (64, 128, 4, 3)],
    "dkdv": [(64, 128, 8, 2), (32, 128, 4, 3), (64, 128, 4, 3), (32, 64, 4, 3),
             (64, 64, 4, 3), (128, 128, 8, 2)],
    "dq": [(128, 64, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 4, 3),
           (64, 32, 4, 3), (128, 128, 8, 2)],
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--buckets", type=int, default=16)
    p.add_argument("--out", default="runs/bench/tune")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    B, H, N, D = 2, 16, args.n, args.dim
    dev = "cuda"
    q, k, v = (torch.randn(B, N, H, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
    do = torch.randn_like(q)
    pos = torch.arange(N, device=dev).expand(B, N)
    cases = {"hash": (dsa.lsh_buckets(q, args.buckets), dsa.lsh_buckets(k, args.buckets)),
             "dense": (torch.zeros(B, N, H, dtype=torch.long, device=dev),) * 2}
    results = {}
    for case, (qb, kb) in cases.items():
        plan = make_plan(q, k, qb, kb, pos, pos, causal=True, include_self=True,
                         softmax_scale=None)
        o, lse, lse_s = ta.triton_forward(q, k, v, plan)
        for kind, cands in CANDIDATES.items():
            for cfg in cands:
                if kind == "fwd":
                    fn = lambda: ta.triton_forward(q, k, v, plan, tiles=cfg)  # noqa: E731
                else:       # one backward kernel varied at a time, the other as tuned
                    tiles = {f"{kind}_tiles": cfg}
                    fn = lambda: ta.triton_backward(do, None, q, k, v, o, lse, lse_s,  # noqa: E731
                                                    plan, **tiles)
                try:
                    ms = do_bench(fn, warmup=10, rep=50, return_mode="median")
                except Exception as e:                               # e.g. out of shared memory
                    print(f"{case:5} {kind:4} {cfg} failed: {type(e).__name__}", flush=True)
                    continue
                results.setdefault(f"{case}/{kind}", []).append((ms, cfg))
                print(f"{case:5} {kind:4} {cfg} {ms:8.3f} ms", flush=True)
    print("\nbest:")
    for key, lst in results.items():
        ms, cfg = min(lst)
        print(f"  {key:12} {cfg} {ms:.3f} ms")
    with open(os.path.join(args.out, f"tune_D{D}.json"), "w") as f:
        json.dump({k: [[ms, list(c)] for ms, c in v] for k, v in results.items()}, f)

    # where does end-to-end time go besides the kernels?
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    for _ in range(3):
        dsa.hash_sparse_attention(qg, kg, vg, args.buckets).backward(do)
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            dsa.hash_sparse_attention(qg, kg, vg, args.buckets).backward(do)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=50))


if __name__ == "__main__":
    main()
