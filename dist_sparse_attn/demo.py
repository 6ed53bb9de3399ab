"""Demo: the public API on random data, checked and timed against dense SDPA.

    python -m dist_sparse_attn.demo                      # CPU: ~45 s on 2 idle cores
    python -m dist_sparse_attn.demo --seqlens 16384 --buckets 16,64 --device cuda

1. A small case (GQA, odd length) is checked against
   :func:`dist_sparse_attn.reference_attention` (float64 oracle): output and
   gradients of hash-sparse, QK-sparse and dense, plus dense vs SDPA.
2. For each sequence length, hash-sparse (several bucket counts), QK-sparse
   (several drop rates) and the dense special case (every bucket 0) are timed,
   forward and forward+backward, end to end (hashing, sort, kernel, unsort),
   against dense causal ``torch.nn.functional.scaled_dot_product_attention``
   (inputs in our (B, N, H, D) layout, transposed to SDPA's (B, H, N, D) and
   back inside the timed region). ``tiles`` is the fraction of the dense causal
   tiles the tiled backend computes (``kernels.torch_tiled.tile_stats``);
   ``allowed`` is the fraction of the computed (query, key) pairs that are
   allowed, i.e. the work not wasted on masking.

The timing helpers here are shared with ``benchmarks/bench_cpu.py``.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import dist_sparse_attn as dsa
from dist_sparse_attn.kernels.torch_tiled import tile_stats
from dist_sparse_attn.plan import make_plan


# ----------------------------------------------------------------------------- helpers
def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    return dev


def pick_backend(device: torch.device) -> str:
    """``"auto"``, or ``"torch"`` on CUDA when this checkout has no Triton kernels yet."""
    if device.type == "cuda" and importlib.util.find_spec(
            "dist_sparse_attn.kernels.triton_attn") is None:
        return "torch"
    return "auto"


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, *, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in milliseconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def fwd_and_fwdbwd_ms(attn, q, k, v, *, repeats: int, warmup: int = 1):
    """(forward ms, forward+backward ms) of ``o = attn(q, k, v)``, q/k/v leaf tensors.

    ``warmup`` untimed forward+backward calls come first (they warm both
    passes). Forward alone runs under ``no_grad`` (no autograd state saved);
    the backward pass gets a fixed random upstream gradient.
    """
    do = torch.randn_like(q)

    def fwd():
        with torch.no_grad():
            attn(q, k, v)

    def fwd_bwd():
        for t in (q, k, v):
            t.grad = None
        attn(q, k, v).backward(do)

    dev = q.device
    fb = time_ms(fwd_bwd, dev, repeats=repeats, warmup=warmup)
    return time_ms(fwd, dev, repeats=repeats, warmup=0), fb


def sdpa_causal(q, k, v):
    """Dense causal SDPA on our layout: (B, N, H, D) -> (B, H, N, D) -> back."""
    gqa = q.shape[2] != k.shape[2]
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                       v.transpose(1, 2), is_causal=True,
                                       **({"enable_gqa": True} if gqa else {}))
    return o.transpose(1, 2)                                                # (B, N, H, D)


def dense_causal_flops(B, H, N, D, *, backward=False) -> float:
    """FLOPs of dense causal attention (the convention of benchmarks/README.md):
    4·B·H·N²·D / 2, ×3.5 with backward."""
    f = 4 * B * H * N * N * D / 2
    return f * 3.5 if backward else f


def random_qkv(B, N, H, Hkv, D, *, device, dtype, generator=None):
    """Random leaf tensors q (B, N, H, D), k, v (B, N, Hkv, D) with requires_grad."""
    def r(h):
        x = torch.randn(B, N, h, D, generator=generator, dtype=torch.float32)
        return x.to(device=device, dtype=dtype).requires_grad_()
    return r(H), r(Hkv), r(Hkv)


def hash_buckets(q, k, n_buckets, seed=0):
    """The buckets hash_sparse_attention uses: q (B, N, H), k (B, N, Hkv)."""
    g = q.shape[2] // k.shape[2]
    with torch.no_grad():
        return (dsa.lsh_buckets(q, n_buckets, seed=seed, group_size=g),
                dsa.lsh_buckets(k, n_buckets, seed=seed))


def sparsity_stats(q, k, q_buckets, k_buckets, *, causal=True, include_self=True):
    """Tiles and pairs the tiled backend computes for these buckets (default positions).

    Returns ``{"block", "live_tiles", "tiles_vs_causal", "allowed_pairs",
    "allowed_frac"}``: ``tiles_vs_causal`` = live tiles / live tiles of dense
    causal attention at the same size; ``allowed_frac`` = allowed (query, key)
    pairs / pairs in the computed tiles.
    """
    B, Nq = q.shape[:2]
    Nk = k.shape[1]
    qp = torch.arange(Nq, device=q.device).expand(B, Nq)                    # (B, Nq)
    kp = torch.arange(Nk, device=q.device).expand(B, Nk)                    # (B, Nk)
    kw = dict(causal=causal, include_self=include_self, softmax_scale=None)
    st = tile_stats(make_plan(q, k, q_buckets, k_buckets, qp, kp, **kw))
    dense = tile_stats(make_plan(q, k, torch.zeros_like(q_buckets), torch.zeros_like(k_buckets),
                                 qp, kp, **kw))
    allowed = allowed_pairs(q_buckets, k_buckets, causal=causal, include_self=include_self)
    computed = st["live_tiles"] * st["block"] ** 2
    return {"block": st["block"], "live_tiles": st["live_tiles"],
            "tiles_vs_causal": st["live_tiles"] / max(1, dense["live_tiles"]),
            "allowed_pairs": allowed,
            "allowed_frac": allowed / computed if computed else 1.0}


def allowed_pairs(q_buckets, k_buckets, *, causal=True, include_self=True) -> int:
    """Number of allowed (query, key) pairs with default positions (token index).

    q_buckets (B, Nq, H), k_buckets (B, Nk, Hkv). Keys of each (batch, kv head)
    are sorted by the code ``bucket * Nk + position``; each query's allowed keys
    are then one range, found by two binary searches: O(N log N), no N^2 mask.
    """
    B, Nq, H = q_buckets.shape
    Nk, Hkv = k_buckets.shape[1], k_buckets.shape[2]
    kb = k_buckets.permute(0, 2, 1).long().repeat_interleave(H // Hkv, 1)  # (B, H, Nk)
    qb = q_buckets.permute(0, 2, 1).long()                                  # (B, H, Nq)
    kpos = torch.arange(Nk, device=kb.device)
    kcode = torch.where(kb >= 0, kb * Nk + kpos, -1)                        # dropped: -1
    kcode, _ = torch.sort(kcode, dim=-1)                                    # (B, H, Nk)
    lo = qb * Nk                                                            # (B, H, Nq)
    if causal:
        last = torch.arange(Nq, device=qb.device) - (0 if include_self else 1)
        hi = lo + last.clamp(max=Nk - 1)                                    # last key allowed
    else:
        hi = lo + Nk - 1
    n = torch.searchsorted(kcode, hi.contiguous(), right=True) \
        - torch.searchsorted(kcode, lo.contiguous(), right=False)
    n = torch.where(qb >= 0, n.clamp_min(0), torch.zeros_like(n))
    return int(n.sum())


# ----------------------------------------------------------------------------- check
def check_small(device: torch.device, backend: str) -> float:
    """Compare every API entry point with the float64 oracle on a small GQA case.

    Prints the max abs errors of outputs and gradients; returns the largest (``inf``
    when an output or gradient is not finite: a NaN error must not read as a pass).
    """
    gen = torch.Generator().manual_seed(1234)
    B, N, H, Hkv, D = 2, 257, 4, 2, 64
    q, k, v = random_qkv(B, N, H, Hkv, D, device=device, dtype=torch.float32, generator=gen)
    do = torch.randn(B, N, H, D, generator=gen).to(device)
    q_keep = (torch.rand(B, N, H, generator=gen) > 0.5).to(device)
    k_keep = (torch.rand(B, N, Hkv, generator=gen) > 0.5).to(device)
    qb16, kb16 = hash_buckets(q, k, 16)
    zq, zk = torch.zeros(B, N, H, dtype=torch.int64, device=device), \
        torch.zeros(B, N, Hkv, dtype=torch.int64, device=device)
    cases = [
        ("hash-sparse, 16 buckets",
         lambda q, k, v: dsa.hash_sparse_attention(q, k, v, 16, backend=backend),
         lambda q, k, v: dsa.reference_attention(q, k, v, qb16, kb16)),
        ("qk-sparse, 50% dropped",
         lambda q, k, v: dsa.qk_sparse_attention(q, k, v, q_keep, k_keep, backend=backend),
         lambda q, k, v: dsa.reference_attention(q, k, v, dsa.keep_to_buckets(q_keep),
                                                 dsa.keep_to_buckets(k_keep))),
        ("dense (all buckets 0)",
         lambda q, k, v: dsa.bucketed_attention(q, k, v, zq, zk, backend=backend),
         lambda q, k, v: dsa.reference_attention(q, k, v, zq, zk)),
        ("dense vs causal SDPA",
         lambda q, k, v: dsa.bucketed_attention(q, k, v, zq, zk, backend=backend),
         sdpa_causal),
    ]
    print(f"check vs reference_attention: B={B} N={N} H={H} Hkv={Hkv} D={D} float32, "
          f"backend={backend!r}", flush=True)
    worst = 0.0
    for name, ours, ref in cases:
        outs = []
        for fn in (ours, ref):
            for t in (q, k, v):
                t.grad = None
            o = fn(q, k, v)
            o.backward(do)
            outs.append([o.detach()] + [t.grad.clone() for t in (q, k, v)])
        errs = [(a - b).abs().max().item() for a, b in zip(*outs)]
        # max() drops a NaN after a number (nan > x is False): count it as infinite
        worst = max(worst, *(e if math.isfinite(e) else math.inf for e in errs))
        print(f"  {name:<24} max |err|  o {errs[0]:.1e}  dq {errs[1]:.1e}  "
              f"dk {errs[2]:.1e}  dv {errs[3]:.1e}", flush=True)
    return worst


# ----------------------------------------------------------------------------- timing table
_HEADER = (f"{'N':>6}  {'method':<22} {'fwd ms':>9} {'x SDPA':>7} {'fwd+bwd ms':>11} "
           f"{'x SDPA':>7} {'tiles':>6} {'allowed':>8}")


def _row(N, name, fwd, fb, base=None, stats=None):
    sp = (f"{base[0] / fwd:>7.2f}", f"{base[1] / fb:>7.2f}") if base else (f"{'1.00':>7}",) * 2
    st = (f"{stats['tiles_vs_causal']:>6.3f} {stats['allowed_frac']:>8.3f}" if stats
          else f"{'-':>6} {'-':>8}")
    return f"{N:>6}  {name:<22} {fwd:>9.1f} {sp[0]} {fb:>11.1f} {sp[1]} {st}"


def run_table(args, device, dtype, backend):
    print(f"\ntimings: B={args.batch} H={args.heads} Hkv={args.kv_heads} D={args.dim} {dtype}, "
          f"median of {args.repeats} (warm-up 1); 'x SDPA' = speed-up over dense causal SDPA",
          flush=True)
    print(_HEADER + "\n" + "-" * len(_HEADER), flush=True)
    gen = torch.Generator().manual_seed(args.seed)
    for N in args.seqlens:
        q, k, v = random_qkv(args.batch, N, args.heads, args.kv_heads, args.dim,
                             device=device, dtype=dtype, generator=gen)
        base = fwd_and_fwdbwd_ms(sdpa_causal, q, k, v, repeats=args.repeats)
        print(_row(N, "SDPA dense causal", *base), flush=True)

        zq = torch.zeros(q.shape[:3], dtype=torch.int64, device=device)
        zk = torch.zeros(k.shape[:3], dtype=torch.int64, device=device)
        t = fwd_and_fwdbwd_ms(lambda q, k, v: dsa.bucketed_attention(
            q, k, v, zq, zk, backend=backend), q, k, v, repeats=args.repeats)
        print(_row(N, "dense (buckets = 0)", *t, base, sparsity_stats(q, k, zq, zk)), flush=True)

        for nb in args.buckets:
            t = fwd_and_fwdbwd_ms(lambda q, k, v: dsa.hash_sparse_attention(
                q, k, v, nb, backend=backend), q, k, v, repeats=args.repeats)
            st = sparsity_stats(q, k, *hash_buckets(q, k, nb))
            print(_row(N, f"hash-sparse {nb} buckets", *t, base, st), flush=True)

        for drop in args.drop_rates:
            q_keep = torch.rand(q.shape[:3], generator=gen).to(device) >= drop
            k_keep = torch.rand(k.shape[:3], generator=gen).to(device) >= drop
            t = fwd_and_fwdbwd_ms(lambda q, k, v: dsa.qk_sparse_attention(
                q, k, v, q_keep, k_keep, backend=backend), q, k, v, repeats=args.repeats)
            st = sparsity_stats(q, k, dsa.keep_to_buckets(q_keep), dsa.keep_to_buckets(k_keep))
            print(_row(N, f"qk-sparse {drop:.0%} dropped", *t, base, st), flush=True)


# ----------------------------------------------------------------------------- main
def _ints(s):
    return [int(x) for x in s.split(",") if x]


def _floats(s):
    return [float(x) for x in s.split(",") if x]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m dist_sparse_attn.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda")
    p.add_argument("--seqlens", type=_ints, default=None,
                   help="comma-separated sequence lengths (default: 4096,8192 on CPU, "
                        "8192,16384,32768 on CUDA)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4, help="query heads H")
    p.add_argument("--kv-heads", type=int, default=None, help="k/v heads Hkv (default: H)")
    p.add_argument("--dim", type=int, default=64, help="head dim D")
    p.add_argument("--buckets", type=_ints, default=[4, 16, 64],
                   help="hash-sparse bucket counts (even), comma-separated")
    p.add_argument("--drop-rates", type=_floats, default=[0.5, 0.8],
                   help="QK-sparse fractions of queries/keys dropped, comma-separated")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="timing dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per entry (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-check", action="store_true", help="skip the reference check")
    args = p.parse_args(argv)
    args.kv_heads = args.kv_heads or args.heads
    if args.heads % args.kv_heads:
        p.error(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    if any(nb < 2 or nb % 2 for nb in args.buckets):
        p.error(f"--buckets must be even integers >= 2, got {args.buckets}")
    if any(not 0 <= d < 1 for d in args.drop_rates):
        p.error(f"--drop-rates must lie in [0, 1), got {args.drop_rates}")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    backend = pick_backend(device)
    if args.seqlens is None:
        args.seqlens = [8192, 16384, 32768] if device.type == "cuda" else [4096, 8192]
    dtype = getattr(torch, args.dtype) if args.dtype else \
        (torch.bfloat16 if device.type == "cuda" else torch.float32)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" \
        else f"CPU, {torch.get_num_threads()} threads"
    print(f"dist_sparse_attn {dsa.__version__}, torch {torch.__version__}, device {device} "
          f"({where}), backend {backend!r}", flush=True)
    if backend != "auto":
        print("  note: Triton kernels not in this checkout yet; using the tiled PyTorch backend",
              flush=True)
    if not args.skip_check:
        worst = check_small(device, backend)
        ok = worst < 1e-4
        print(f"  largest error {worst:.1e}: {'OK' if ok else 'FAILED'}", flush=True)
        if not ok:
            return 1
    run_table(args, device, dtype, backend)
    return 0


if __name__ == "__main__":
    sys.exit(main())
