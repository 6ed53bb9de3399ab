"""Bucket balance on the q/k of a trained model, not only on random data.

Trains the GPT of ``dist_sparse_attn.model`` (hash attention, block-local heads) for a
few hundred steps on the embedded stdlib corpus (plain PyTorch, AdamW, bf16 autocast
on CUDA), then runs one validation sequence and hashes every layer's rotated q and k
with several bucket counts. For each count it reports, over the LSH heads of all
layers, the largest bucket over the mean bucket size (keys per (kv head, bucket)),
the mean of that ratio, and the same for Gaussian q/k of the same shape; with
``--cap`` also the ratio after :func:`dist_sparse_attn.balance.cap_buckets` at that
multiple of the mean, and the fraction of causal (query, key) pairs of the buckets the
cap removes (how much of the bucket attention a query loses).

    python benchmarks/bench_balance.py --seq-len 16384 --steps 300 --out OUT    # a GPU
    python benchmarks/bench_balance.py --device cpu --small --out /tmp/bal      # smoke test

Writes ``OUT/balance.json`` and prints a table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from dist_sparse_attn import lsh_buckets  # noqa: E402
from dist_sparse_attn.balance import bucket_sizes, cap_buckets  # noqa: E402
from dist_sparse_attn.data import TokenData, stdlib_corpus  # noqa: E402
from dist_sparse_attn.model import GPT, GPTConfig  # noqa: E402


def train(cfg: GPTConfig, seq_len: int, steps: int, lr: float, device, seed: int):
    torch.manual_seed(seed)
    model = GPT(cfg).to(device)
    data = TokenData(stdlib_corpus(max(4_000_000, 12 * (seq_len + 1))), 0.1)
    opt = model.configure_optimizers(0.1, lr, (0.9, 0.95), device_type=device.type)
    gen = torch.Generator().manual_seed(seed)
    amp = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" \
        else torch.autocast("cpu", enabled=False)
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:      # linear warmup, then constant
            group["lr"] = lr * min(1.0, (step + 1) / max(1, steps // 10))
        x, y = data.batch("train", seq_len, 1, generator=gen)
        with amp:
            _, loss = model(x.to(device), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss))
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            print(f"[balance] step {step + 1}/{steps} loss {sum(losses[-10:]) / len(losses[-10:]):.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    x, _ = data.batch("val", seq_len, 1, generator=torch.Generator().manual_seed(seed + 1))
    return model, x.to(device), losses


@torch.no_grad()
def capture_qk(model: GPT, x):
    """The rotated q (B, N, H, D) and k (B, N, Hkv, D) every layer's attention receives."""
    got = []

    def hook(module, args):     # args: (q, k, v) of the layer's attention op
        got.append((args[0].float().cpu(), args[1].float().cpu()))
    handles = [block.attn.core_attn.register_forward_pre_hook(hook)
               for block in model.transformer.h]
    model.eval()
    amp = torch.autocast("cuda", torch.bfloat16) if x.is_cuda else torch.autocast("cpu", enabled=False)
    try:
        with amp:
            model(x)
    finally:
        for h in handles:
            h.remove()
    return got


def stats(q, k, nb, seed, lsh_heads, cap):
    """max / mean and mean-of-max / mean bucket size over the LSH kv heads; with a cap,
    the same after capping and the fraction of in-bucket causal pairs it removes."""
    g = q.shape[2] // k.shape[2]
    qb = lsh_buckets(q, nb, seed=seed, group_size=g)[:, :, :lsh_heads * g]
    kb = lsh_buckets(k, nb, seed=seed)[:, :, :lsh_heads]
    mean = k.shape[1] / nb
    sizes = bucket_sizes(kb).float()                                          # (B, heads, nb)
    out = {"max_over_mean": float(sizes.max() / mean),
           "mean_max_over_mean": float(sizes.amax(-1).mean() / mean)}
    if cap:
        size = max(1, math.ceil(cap * k.shape[1] / nb))
        cq, ck = cap_buckets(qb, kb, size)
        out["capped_max_over_mean"] = float(bucket_sizes(ck).max() / mean)
        # causal in-bucket pairs (per kv head, queries of its first query head):
        # sum over buckets of n(n+1)/2, before and after the cap
        before = (sizes * (sizes + 1) / 2).sum()
        cs = bucket_sizes(ck).float()
        out["pairs_kept"] = float((cs * (cs + 1) / 2).sum() / before)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=16384)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--buckets", default="16,64,256,1024,2048",
                   help="bucket counts to hash the trained q/k with")
    p.add_argument("--train-buckets", type=int, default=16)
    p.add_argument("--local-heads", type=int, default=4)
    p.add_argument("--cap", type=float, default=4.0, help="cap (x the mean) to evaluate; 0: none")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help="a tiny model and sequence (CPU smoke test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    shape = dict(n_layer=2, n_head=4, n_embd=64) if a.small else \
        dict(n_layer=12, n_head=12, n_embd=768)
    if a.small:
        a.seq_len, a.steps, a.buckets = min(a.seq_len, 512), min(a.steps, 20), "4,16,64,128"
        a.local_heads = min(a.local_heads, 1)
    cfg = GPTConfig(attention="hash", n_buckets=a.train_buckets, local_heads=a.local_heads,
                    seq_len=a.seq_len, **shape)
    model, x, losses = train(cfg, a.seq_len, a.steps, a.lr, device, a.seed)
    qks = capture_qk(model, x)
    lsh_heads = cfg.n_kv_head - cfg.local_heads
    rows = []
    for nb in (int(b) for b in a.buckets.split(",")):
        for source in ("trained", "gaussian"):
            per_layer = []
            for layer, (q, k) in enumerate(qks):
                if source == "gaussian":
                    q, k = torch.randn_like(q), torch.randn_like(k)
                per_layer.append(stats(q, k, nb, cfg.hash_seed + layer, lsh_heads, a.cap))
            row = {"n_buckets": nb, "source": source}
            for key in per_layer[0]:
                vals = [s[key] for s in per_layer]
                # the fullest bucket over all layers; means (over heads, of the kept
                # pairs) over all layers: every layer has the same LSH heads
                row[key] = max(vals) if key in ("max_over_mean", "capped_max_over_mean") \
                    else sum(vals) / len(vals)
            row["per_layer_max_over_mean"] = [s["max_over_mean"] for s in per_layer]
            rows.append(row)
    os.makedirs(a.out, exist_ok=True)
    result = {"seq_len": a.seq_len, "steps": a.steps, "final_train_loss": sum(losses[-10:]) / 10
              if len(losses) >= 10 else losses[-1], "model": shape, "train_buckets": a.train_buckets,
              "local_heads": a.local_heads, "cap": a.cap, "device": str(device),
              "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None, "rows": rows}
    with open(os.path.join(a.out, "balance.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nlargest bucket / mean bucket size over the {lsh_heads} LSH kv heads of "
          f"{len(qks)} layers, N={a.seq_len}, model trained {a.steps} steps:")
    print("| n_buckets | q/k | max/mean | mean of per-head max/mean"
          + (f" | max/mean, cap {a.cap:g} | causal pairs kept" if a.cap else "") + " |")
    print("|---|---|---|---|" + ("---|---|" if a.cap else ""))
    for r in rows:
        print(f"| {r['n_buckets']} | {r['source']} | {r['max_over_mean']:.2f} | "
              f"{r['mean_max_over_mean']:.2f}"
              + (f" | {r['capped_max_over_mean']:.2f} | {r['pairs_kept']:.3f}" if a.cap else "")
              + " |")


if __name__ == "__main__":
    main()
