"""GPU kernel benchmark: sparse attention vs dense SDPA (flash, cuDNN) and FlexAttention.

For every (head dim, N, sparsity) it times, on one GPU in one run:
  * dense causal SDPA, flash and cuDNN backends;
  * this library end to end (hashing / keep-mask, sort, kernels, scatter back);
  * this library kernel alone (buckets, sort and block ranges prepared once; the
    Triton backend of ``kernels.select`` through the autograd Function);
  * FlexAttention given the same mask (on the bucket-sorted layout, which is
    its best case), its block mask prebuilt, and the block-mask build alone;
forward and forward+backward. Prints a table, writes JSON and PNG plots.

Effective TFLOP/s = dense causal FLOPs / time: 4*B*H*N^2*D/2 forward, x3.5 for
forward+backward. Tile TFLOP/s (this library's kernels) = the FLOPs of the tiles the
forward kernel computes (live tiles x 4*BLOCK_M*BLOCK_N*D at its own tile shape, x3.5
for forward+backward) / time: the kernels' throughput on the work they do, comparable
with the effective TFLOP/s of dense causal SDPA.

    python benchmarks/bench_kernels.py [--out runs/bench/kernels]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from triton.testing import do_bench

import dist_sparse_attn as dsa
from dist_sparse_attn import kernels
from dist_sparse_attn.kernels.triton_attn import forward_tiles, tile_fraction
from dist_sparse_attn.ops import BucketedAttentionFunction
from dist_sparse_attn.plan import make_plan, to_streams


def _flops(B, H, N, D, mode):
    """Dense causal attention FLOPs of ``mode`` ("fwd", "fwd+bwd"); None for any other
    row (the FlexAttention block-mask build computes no attention)."""
    if mode not in ("fwd", "fwd+bwd"):
        return None
    f = 4 * B * H * N * N * D / 2
    return f * 3.5 if mode == "fwd+bwd" else f


def tile_flops(live_tiles: int, bm: int, bn: int, D: int, mode: str) -> float:
    """FLOPs of ``live_tiles`` computed (bm x bn) tiles: QK^T and PV, 2*bm*bn*D each,
    forward; x3.5 for forward+backward (the backward's five products = 2.5 forwards)."""
    f = live_tiles * 4 * bm * bn * D
    return f * 3.5 if mode == "fwd+bwd" else f


def row(B, H, D, N, method, mode, ms, sparsity, card, frac=None, base=None, tiles=None):
    """(JSON row, table line) of one timing. tiles: (live tiles, bm, bn) of the forward
    kernel, for the tile TFLOP/s; base: the flash time of the same mode."""
    f = _flops(B, H, N, D, mode)
    eff = f / (ms * 1e-3) / 1e12 if f is not None else None
    tile_tf = tile_flops(*tiles, D, mode) / (ms * 1e-3) / 1e12 if tiles else None
    r = dict(D=D, N=N, method=method, mode=mode, ms=ms, eff_tflops=eff,
             tile_tflops=tile_tf, sparsity=sparsity, tile_fraction=frac, card=card,
             speedup_vs_flash=(base / ms) if base else None)
    sp = f"{base / ms:8.2f}" if base else f"{'':>8}"
    fr = f"{frac:6.3f}" if frac is not None else f"{'':>6}"
    ef = f"{eff:9.1f}" if eff is not None else f"{'':>9}"
    tt = f"{tile_tf:9.1f}" if tile_tf is not None else f"{'':>9}"
    return r, f"{D:>4} {N:>6} {method:<28} {mode:<8} {ms:9.3f} {ef} {sp} {fr} {tt}"


def _time(fn, mode, inputs):
    def step():
        out = fn()
        if mode == "fwd+bwd":
            out.backward(grad)
    with torch.no_grad():
        grad = torch.randn_like(fn())
    return do_bench(step, warmup=10, rep=60, grad_to_none=inputs, return_mode="median")


def _sdpa(q, k, v, backend):
    from torch.nn.attention import sdpa_kernel
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

    def fn():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
    return fn


def _flex_setup(q, k, v, qb, kb):
    """FlexAttention on the bucket-sorted layout with the bucket+causal mask."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    B, N, H, D = q.shape
    pos = torch.arange(N, device=q.device).expand(B, N)
    plan = make_plan(q, k, qb, kb, pos, pos, causal=True, include_self=True,
                     softmax_scale=None)
    sq = plan.q_streams
    sk = plan.k_streams
    qs = to_streams(q.detach(), sq).view(B, H, N, D).requires_grad_()
    ks = to_streams(k.detach(), sk).view(B, H, N, D).requires_grad_()
    vs = to_streams(v.detach(), sk).view(B, H, N, D).requires_grad_()
    qbk, qps = sq.bucket.view(B, H, N), sq.pos.view(B, H, N)
    kbk, kps = sk.bucket.view(B, H, N), sk.pos.view(B, H, N)

    def mask_mod(b, h, qi, ki):
        return (qbk[b, h, qi] == kbk[b, h, ki]) & (kps[b, h, ki] <= qps[b, h, qi])

    def build():
        return create_block_mask(mask_mod, B, H, N, N, device=q.device, _compile=True)
    bm = build()
    flex = torch.compile(flex_attention, dynamic=False)
    return (lambda: flex(qs, ks, vs, block_mask=bm)), build, [qs, ks, vs]


def run(args):
    dev = "cuda"
    B, H = args.batch, args.heads
    rows = []
    from torch.nn.attention import SDPBackend
    card = torch.cuda.get_device_name()
    print(f"# {card}, torch {torch.__version__}, B={B} H={H} bf16", flush=True)
    hdr = (f"{'D':>4} {'N':>6} {'method':<28} {'mode':<8} {'ms':>9} {'eff TF/s':>9} "
           f"{'x flash':>8} {'tiles':>6} {'tile TF/s':>9}")
    print(hdr, flush=True)

    def record(D, N, method, mode, ms, sparsity, frac=None, base=None, tiles=None):
        r, line = row(B, H, D, N, method, mode, ms, sparsity, card, frac, base, tiles)
        rows.append(r)
        print(line, flush=True)

    for D in args.dims:
        for N in args.seqlens:
            torch.manual_seed(0)
            q, k, v = (torch.randn(B, N, H, D, device=dev, dtype=torch.bfloat16,
                                   requires_grad=True) for _ in range(3))
            inputs = [q, k, v]
            base = {}
            for name, be in (("sdpa-flash", SDPBackend.FLASH_ATTENTION),
                             ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)):
                for mode in args.modes:
                    try:
                        ms = _time(_sdpa(q, k, v, be), mode, inputs)
                    except RuntimeError as e:                          # backend unavailable
                        print(f"# {name} skipped: {str(e)[:80]}")
                        continue
                    if name == "sdpa-flash":
                        base[mode] = ms
                    record(D, N, name, mode, ms, "dense", 1.0, base.get(mode))
            # dense special case through our kernel
            zeros = torch.zeros(B, N, H, dtype=torch.long, device=dev)
            cases = [("dense(all bucket 0)", "dense", zeros, zeros)]
            for nb in args.buckets:
                with torch.no_grad():
                    cases.append((f"hash nb={nb}", f"hash{nb}", dsa.lsh_buckets(q, nb),
                                  dsa.lsh_buckets(k, nb)))
            for drop in args.drops:
                keep_q = torch.rand(B, N, H, device=dev) >= drop
                keep_k = torch.rand(B, N, H, device=dev) >= drop
                cases.append((f"qk drop={drop:.0%}", f"qk{drop}", dsa.keep_to_buckets(keep_q),
                              dsa.keep_to_buckets(keep_k)))
            for label, sparsity, qb, kb in cases:
                nb = int(sparsity[4:]) if sparsity.startswith("hash") else None
                pos = torch.arange(N, device=dev).expand(B, N)
                plan = make_plan(q, k, qb, kb, pos, pos, causal=True, include_self=True,
                                 softmax_scale=None)
                bm, bn = forward_tiles(D, q.dtype)
                tf = tile_fraction(plan, bm, bn)
                frac, tiles = tf["fraction"], (tf["live_tiles"], bm, bn)
                be = kernels.select("triton", q.device, q.dtype)
                for mode in args.modes:
                    ms = _time(lambda: BucketedAttentionFunction.apply(q, k, v, plan, be)[0],
                               mode, inputs)
                    record(D, N, f"ours kernel {label}", mode, ms, sparsity, frac,
                           base.get(mode), tiles)
                    if nb is not None:
                        fn = lambda: dsa.hash_sparse_attention(q, k, v, nb)  # noqa: E731
                    elif sparsity.startswith("qk"):
                        kq, kk = qb >= 0, kb >= 0
                        fn = lambda: dsa.qk_sparse_attention(q, k, v, kq, kk)  # noqa: E731
                    else:
                        fn = lambda: dsa.bucketed_attention(q, k, v, zeros, zeros)  # noqa: E731
                    ms = _time(fn, mode, inputs)
                    record(D, N, f"ours e2e {label}", mode, ms, sparsity, frac, base.get(mode))
                if args.flex and nb in args.flex_buckets and N <= args.flex_max_n:
                    try:
                        fn, build, flex_in = _flex_setup(q, k, v, qb, kb)
                        for mode in args.modes:
                            ms = _time(fn, mode, flex_in)
                            record(D, N, f"flex {label}", mode, ms, sparsity, None,
                                   base.get(mode))
                        torch.cuda.synchronize()
                        ms = do_bench(build, warmup=2, rep=20, return_mode="median")
                        record(D, N, f"flex mask build {label}", "build", ms, sparsity)
                    except Exception as e:                              # report, keep going
                        print(f"# flex failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                del plan
            del q, k, v
            torch.cuda.empty_cache()
    return rows


def plot(rows, out):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    for D in sorted({r["D"] for r in rows}):
        fig, axes = plt.subplots(1, 2, figsize=(13, 5))
        for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
            sel = [r for r in rows if r["D"] == D and r["mode"] == mode]
            for m in sorted({r["method"] for r in sel}):
                if not (m.startswith("sdpa") or "e2e" in m or m.startswith("flex")):
                    continue
                pts = sorted((r["N"], r["ms"]) for r in sel if r["method"] == m)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length N")
            ax.set_ylabel("ms (median)")
            ax.set_title(f"{mode}, D={D}, bf16")
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"kernels_D{D}.png"), dpi=110)
        plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="runs/bench/kernels")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--seqlens", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536])
    p.add_argument("--buckets", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64])
    p.add_argument("--drops", type=float, nargs="+", default=[0.2, 0.5, 0.8])
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"])
    p.add_argument("--no-flex", dest="flex", action="store_false")
    p.add_argument("--flex-buckets", type=int, nargs="+", default=[16])
    p.add_argument("--flex-max-n", type=int, default=32768)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU")
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    rows = run(args)
    name = os.path.join(args.out, "kernels.json")
    with open(name, "w") as f:
        json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    plot(rows, args.out)
    print(f"# wrote {name} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
