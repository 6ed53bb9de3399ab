"""LSH hashing cost at a fixed bucket size: product scheme vs one rotation (classic).

For N tokens with ``n_buckets = N / tokens_per_bucket`` (default 512) it measures
  * ``hash``: ``lsh_buckets(q, nb)`` + ``lsh_buckets(k, nb)`` (the library: the
    product scheme for nb > 64, the fused Triton kernel on CUDA);
  * ``attn``: ``bucketed_attention`` forward + backward on those precomputed buckets;
  * ``whole``: ``hash_sparse_attention`` forward + backward (hashing, sort, attention);
  * ``share``: hash / whole, and ``growth``: hash time over that of the previous N
    (per doubling of N when the sizes double; linear hashing gives 2x);
  * ``max/mean``: tokens of the fullest (head, bucket) of q over the mean N / nb,
    for random normal q;
  * the same hash time and max/mean for the classic scheme at the same nb
    (``argmax([xR ; -xR])`` with one Gaussian rotation (D, nb/2), in PyTorch ops in
    chunks of tokens: how every nb > 64 was hashed before the product scheme).
GPU times are medians of ``triton.testing.do_bench``; CPU times (``--device cpu``)
medians of ``--reps`` wall-clock runs after a warm-up. Prints a table and writes
JSON (``--out``).

    python benchmarks/bench_hashing.py --out hashing.json            # H200: 128k .. 2M
    python benchmarks/bench_hashing.py --device cpu --small --out x.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import dist_sparse_attn as dsa
from dist_sparse_attn.hashing import LSHScheme, lsh_scheme
from dist_sparse_attn.kernels.torch_hash import buckets_of_projections

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _bench(fn, device, reps, grad_to_none=None):
    """Median ms per call."""
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none,
                                       return_mode="median")
    fn()
    times = []
    for _ in range(reps):
        if grad_to_none:
            for x in grad_to_none:
                x.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def classic_rotation(heads, dim, n_buckets, seed=0, device="cpu"):
    """The classic scheme's rotation (heads, D, nb/2), drawn as lsh_rotations draws it
    for nb <= 64, on ``device``."""
    rot = torch.randn(heads, dim, n_buckets // 2, generator=torch.Generator().manual_seed(seed))
    return rot.to(device)


def classic_buckets(x, n_buckets, seed=0, rot=None):
    """The classic scheme at any n_buckets: one Gaussian rotation (heads, D, nb/2)
    (``rot``, default :func:`classic_rotation` of ``seed``), argmax over [xR ; -xR] in
    chunks of tokens."""
    B, N, H, D = x.shape
    if rot is None:
        rot = classic_rotation(H, D, n_buckets, seed, x.device)
    scheme = LSHScheme(n_buckets, (n_buckets,), classic=True)
    step = max(1, (1 << 26) // max(1, B * H * n_buckets))
    out = torch.empty(B, N, H, dtype=torch.int64, device=x.device)
    for s in range(0, N, step):
        xr = torch.einsum("bnhd,hdc->bnhc", x[:, s:s + step].float(), rot)
        out[:, s:s + step] = buckets_of_projections(xr, scheme)
    return out


def max_over_mean(buckets, n_buckets):
    """Tokens of the fullest (head, bucket) over the mean tokens per (head, bucket)."""
    B, N, H = buckets.shape
    ids = buckets + n_buckets * torch.arange(H, device=buckets.device)
    counts = torch.bincount(ids.flatten(), minlength=H * n_buckets)
    return counts.max().item() / (B * N / n_buckets)


def measure(N, args, device, dtype):
    nb = N // args.tokens_per_bucket
    nb += nb % 2
    B, H, Hkv, D = 1, args.heads, args.kv_heads, args.dim
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, N, H, D, device=device, dtype=dtype, generator=gen)
    k = torch.randn(B, N, Hkv, D, device=device, dtype=dtype, generator=gen)
    v = torch.randn(B, N, Hkv, D, device=device, dtype=dtype, generator=gen)
    do = torch.randn(B, N, H, D, device=device, dtype=dtype, generator=gen)
    g = H // Hkv
    row = {"N": N, "n_buckets": nb, "factors": list(lsh_scheme(nb).factors),
           "merge": lsh_scheme(nb).merge, "classic": lsh_scheme(nb).classic}

    def hash_qk():
        return dsa.lsh_buckets(q, nb, group_size=g), dsa.lsh_buckets(k, nb)

    row["hash_ms"] = _bench(hash_qk, device, args.reps)
    qb, kb = hash_qk()
    row["max_mean"] = max_over_mean(qb, nb)
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]

    def attn():
        dsa.bucketed_attention(*leaves, qb, kb).backward(do)

    def whole():
        dsa.hash_sparse_attention(*leaves, nb).backward(do)

    row["attn_ms"] = _bench(attn, device, args.reps, grad_to_none=leaves)
    row["whole_ms"] = _bench(whole, device, args.reps, grad_to_none=leaves)
    row["hash_share"] = row["hash_ms"] / row["whole_ms"]
    if N <= args.classic_max_n:
        # the rotations drawn and moved to the device once, outside the timing, as the
        # library's lsh_buckets caches its own: both columns time the hashing alone
        rq, rk = (classic_rotation(x.shape[2], D, nb, 0, device) for x in (q, k))
        row["classic_hash_ms"] = _bench(
            lambda: (classic_buckets(q, nb, rot=rq), classic_buckets(k, nb, rot=rk)), device,
            args.reps)
        row["classic_max_mean"] = max_over_mean(classic_buckets(q, nb), nb)
    return row


def _fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else str(v if v is not None else "-")


def table(rows):
    head = (f"{'N':>8} {'nb':>6} {'factors':>12} | {'hash ms':>8} {'growth':>6} "
            f"{'attn ms':>8} {'whole ms':>9} {'share':>6} {'max/mean':>8} | "
            f"{'classic ms':>10} {'growth':>6} {'max/mean':>8}")
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['N']:>8} {r.get('n_buckets', '-'):>6}  {r['error']}")
            continue
        fac = "x".join(map(str, r["factors"])) + (f"/M{r['merge']}" if r["merge"] else "")
        lines.append(
            f"{r['N']:>8} {r['n_buckets']:>6} {fac:>12} | {r['hash_ms']:8.3f} "
            f"{_fmt(r.get('hash_growth'), '6.2f'):>6} {r['attn_ms']:8.3f} {r['whole_ms']:9.3f} "
            f"{r['hash_share']:6.1%} {r['max_mean']:8.2f} | "
            f"{_fmt(r.get('classic_hash_ms'), '10.3f'):>10} "
            f"{_fmt(r.get('classic_hash_growth'), '6.2f'):>6} "
            f"{_fmt(r.get('classic_max_mean'), '8.2f'):>8}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--small", action="store_true",
                    help="tiny sizes (CPU smoke run: N 2048, 4096; 2 heads, D 16, fp32, "
                         "16 tokens per bucket)")
    ap.add_argument("--sizes", type=int, nargs="+",
                    default=[2 ** 17, 2 ** 18, 2 ** 19, 2 ** 20, 2 ** 21])
    ap.add_argument("--tokens-per-bucket", type=int, default=512)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=12)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--classic-max-n", type=int, default=2 ** 21,
                    help="largest N at which the classic scheme is timed too")
    ap.add_argument("--reps", type=int, default=5, help="CPU: timed runs per measurement")
    ap.add_argument("--out", required=True, help="JSON file to write")
    args = ap.parse_args(argv)
    if args.small:
        args.sizes, args.tokens_per_bucket = [2048, 4096], 16
        args.heads = args.kv_heads = 2
        args.dim, args.dtype, args.reps = 16, "fp32", 3
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_hashing.py: --device cuda needs a CUDA GPU; nothing was measured",
              file=sys.stderr)
        return 2
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    print(f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, "
          f"torch {torch.__version__}, B=1 H={args.heads} Hkv={args.kv_heads} D={args.dim} "
          f"{args.dtype}, {args.tokens_per_bucket} tokens per bucket", flush=True)
    rows = []
    for N in args.sizes:
        try:
            row = measure(N, args, device, dtype)
        except torch.OutOfMemoryError as e:
            row = {"N": N, "error": f"out of memory: {str(e).splitlines()[0]}"}
        prev = next((r for r in reversed(rows) if "error" not in r), None)
        if prev is not None and "error" not in row:
            row["hash_growth"] = row["hash_ms"] / prev["hash_ms"]
            if "classic_hash_ms" in row and "classic_hash_ms" in prev:
                row["classic_hash_growth"] = row["classic_hash_ms"] / prev["classic_hash_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "config": {k: v for k, v in vars(args).items()
                                                      if k != "out"},
              "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
