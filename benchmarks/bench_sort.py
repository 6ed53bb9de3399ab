"""GPU micro-benchmark: torch.sort vs the Triton counting sort of stream keys.

For training-like (S = batch * heads, N tokens, n_buckets) shapes it times the
CUDA backend's ``sort_keys(key)`` (no promise: torch.sort, stable) and
``sort_keys(key, n_buckets)`` (kernels/triton_sort.py where it applies), per call
(``be = dist_sparse_attn.kernels.select("auto", "cuda")``):
  * device time: CUDA events around `--calls` back-to-back calls;
  * host time: time.perf_counter around `--calls` calls with no sync in
    between (the sync comes after the clock stops). If the GPU is the
    bottleneck the launch queue may fill and block, inflating this number;
    the column ``bound`` says which of the two is larger;
  * launches per call (kernels and memsets seen by torch.profiler), with --profile.
Checks once per shape that both give the same (key, index).

    python benchmarks/bench_sort.py [--calls 50] [--profile]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

SHAPES = [  # (S, N, n_buckets)
    (12, 16384, 16),       # GPT-2-small heads, 16k tokens, batch 1
    (24, 16384, 16),       # batch 2
    (24, 16384, 64),
    (12, 65536, 16),
    (3, 131072, 16),       # 128k tokens, 12 heads over 4 Ulysses ranks
    (12, 131072, 64),
    (24, 16384, 4096),     # many buckets (largest chunk)
    (12, 2 ** 20, 2048),   # 1M tokens, fixed bucket size ~512
]


def _keys(S, N, nb, device):
    b = torch.randint(0, nb, (S, N), device=device)
    return (b << 32) | (torch.arange(N, device=device) + 2 ** 31)


def _time(fn, calls):
    """(device ms, host ms) per call."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - t0
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls, host * 1e3 / calls


def _launches(fn):
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    return len(names)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--profile", action="store_true", help="count launches per call")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_sort.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                 "nothing was measured.")
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}, "
          f"{args.calls} calls per timing; ms per call")
    head = (f"{'S':>4} {'N':>8} {'nb':>5} {'C':>5} | {'sort dev':>9} {'host':>7} | "
            f"{'count dev':>9} {'host':>7} | {'bound':>6} {'host x':>7}")
    if args.profile:
        head += " | launches sort/count"
    print(head)
    for S, N, nb in SHAPES:
        print(_row(S, N, nb, dev, args), flush=True)
        torch.cuda.empty_cache()


def _row(S, N, nb, dev, args):
    from dist_sparse_attn import kernels
    from dist_sparse_attn.kernels.triton_sort import _chunk_size, counting_sort_applies
    sort_keys = kernels.select("auto", dev).sort_keys
    key = _keys(S, N, nb, dev)
    applies = counting_sort_applies(S, N, nb)
    a, b = sort_keys(key), sort_keys(key, nb)
    same = torch.equal(a.key, b.key) and torch.equal(a.index, b.index)
    ts_dev, ts_host = _time(lambda: sort_keys(key), args.calls)
    cs_dev, cs_host = _time(lambda: sort_keys(key, nb), args.calls)
    bound = "host" if cs_host > cs_dev else "device"
    line = (f"{S:>4} {N:>8} {nb:>5} {(_chunk_size(N, nb + 1) if applies else '-'):>5} | "
            f"{ts_dev:9.3f} {ts_host:7.3f} | {cs_dev:9.3f} {cs_host:7.3f} | "
            f"{bound:>6} {ts_host / cs_host:6.1f}x")
    if args.profile:
        line += f" | {_launches(lambda: sort_keys(key))}/{_launches(lambda: sort_keys(key, nb))}"
    if not applies:
        line += "  (counting sort does not apply: torch.sort both)"
    if not same:
        line += "  MISMATCH"
    return line


if __name__ == "__main__":
    main()
