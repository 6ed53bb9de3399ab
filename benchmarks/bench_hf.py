"""Hugging Face transformers benchmark: a Llama-3.2-1B-shaped model (16 layers, d=2048,
32 query / 8 kv heads of dim 64, MLP 8192, tied embeddings; random init) on one GPU with
``attn_implementation="sdpa"`` against this library's implementations registered by
:func:`dist_sparse_attn.integrations.transformers.register`, in the same process.

Speed (``--mode speed``): for every sequence length (default 32k, 64k, 128k) and
implementation, training steps of batch 1 (forward, backward, AdamW step); the step
time is the median of ``--steps`` steps after ``--warmup`` steps, tokens/s = tokens /
that median, and the peak memory is ``torch.cuda.max_memory_allocated`` over the steps
(model, gradients and optimizer state included).
Activation checkpointing (per decoder layer, non-reentrant) is on from
``--ckpt-min-len`` tokens. The loss is computed in chunks of ``--loss-chunk`` tokens
(each chunk's logits recomputed in backward), so no (N, vocab) logits tensor exists:
at 128k tokens and a 128k vocabulary it would take 32 GiB in bf16.

Quality (``--mode quality``): the training loss at equal steps of ``sdpa`` and hash with
block-local heads (``--quality-impls``), ``--quality-steps`` steps of one
``--quality-seq-len``-token window of byte-level text (the Python standard library's
sources, :func:`dist_sparse_attn.data.stdlib_corpus`; the model's vocabulary is 256 for
this mode), the same windows in the same order for every implementation, AdamW with fp32
master weights and bf16 autocast (``--quality-precision``), and the validation loss every
``--eval-every`` steps.

Implementations (``--impls``): ``sdpa``; ``hash-local`` (hash, ``--bucket-size`` tokens per
bucket, i.e. n_buckets = N / bucket_size, the last ``--local-heads`` kv heads block-local
with ``--local-window``); ``hash`` (the same without local heads); ``qk`` (keep rate
``--keep-rate``); ``eager`` is refused (an N x N matrix).

Writes ``--out`` (JSON, rewritten after every run) and prints a table.

    # one H200 (repository root)
    python benchmarks/bench_hf.py --mode speed --out bench_hf_speed.json
    python benchmarks/bench_hf.py --mode quality --out bench_hf_quality.json
    # CPU smoke test: tiny model and sequences, both modes
    python benchmarks/bench_hf.py --cpu-smoke --out /tmp/bench_hf.json
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

IMPLS = ("sdpa", "hash-local", "hash", "qk")


def parse_n(text) -> int:
    """'16384', '16k', '1M' -> tokens (k = 1024, M = 2**20)."""
    t = str(text).strip().lower()
    mult = {"k": 2 ** 10, "m": 2 ** 20}.get(t[-1:], 1)
    return int(float(t[:-1] if mult > 1 else t) * mult)


def fmt_n(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="speed", choices=("speed", "quality", "both"))
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny model and sequences on the CPU, both modes (a smoke test)")
    p.add_argument("--device", default=None, help="default cuda (cpu with --cpu-smoke)")
    g = p.add_argument_group("model (Llama-3.2-1B shape)")
    g.add_argument("--layers", type=int, default=16)
    g.add_argument("--d-model", type=int, default=2048)
    g.add_argument("--heads", type=int, default=32)
    g.add_argument("--kv-heads", type=int, default=8)
    g.add_argument("--head-dim", type=int, default=64)
    g.add_argument("--ffn", type=int, default=8192)
    g.add_argument("--vocab", type=int, default=128256, help="speed mode (quality: 256)")
    g.add_argument("--rope-theta", type=float, default=500000.0)
    g = p.add_argument_group("attention")
    g.add_argument("--impls", default="sdpa,hash-local,qk",
                   help=f"comma list of {', '.join(IMPLS)}")
    g.add_argument("--bucket-size", type=int, default=1024,
                   help="hash: target tokens per bucket (n_buckets = N / bucket_size, even)")
    g.add_argument("--local-heads", type=int, default=2, help="hash-local: block-local kv heads")
    g.add_argument("--local-window", type=int, default=1024)
    g.add_argument("--keep-rate", type=float, default=0.5, help="qk: kept fraction")
    g.add_argument("--seed", type=int, default=0, help="weights and LSH seed")
    g = p.add_argument_group("speed")
    g.add_argument("--seq-lens", default="32k,64k,128k")
    g.add_argument("--steps", type=int, default=5, help="measured steps (median)")
    g.add_argument("--warmup", type=int, default=2)
    g.add_argument("--precision", default="bf16", choices=("bf16", "amp", "fp32"),
                   help="bf16: bf16 weights and optimizer state; amp: fp32 weights + bf16 "
                        "autocast; fp32")
    g.add_argument("--ckpt-min-len", default="16k",
                   help="activation checkpointing from this many tokens on")
    g.add_argument("--loss-chunk", type=int, default=8192, help="tokens per loss chunk")
    g.add_argument("--lr", type=float, default=3e-4)
    g = p.add_argument_group("quality")
    g.add_argument("--quality-impls", default="sdpa,hash-local")
    g.add_argument("--quality-seq-len", default="16k")
    g.add_argument("--quality-steps", type=int, default=300)
    g.add_argument("--quality-precision", default="amp", choices=("bf16", "amp", "fp32"))
    g.add_argument("--quality-bytes", type=int, default=24_000_000,
                   help="bytes of stdlib sources to use (train 95%%, val 5%%)")
    g.add_argument("--quality-warmup", type=int, default=30, help="linear lr warmup steps")
    g.add_argument("--eval-every", type=int, default=50)
    g.add_argument("--eval-batches", type=int, default=4)
    a = p.parse_args(argv)
    if a.cpu_smoke:
        a.mode, a.device = "both", a.device or "cpu"
        a.layers, a.d_model, a.heads, a.kv_heads, a.head_dim, a.ffn = 2, 64, 4, 2, 16, 128
        a.vocab, a.seq_lens, a.steps, a.warmup, a.precision = 256, "64,96", 2, 1, "fp32"
        a.bucket_size, a.local_heads, a.local_window, a.ckpt_min_len = 16, 1, 16, "96"
        a.loss_chunk = 40
        a.quality_seq_len, a.quality_steps, a.quality_precision = "64", 4, "fp32"
        a.quality_bytes, a.quality_warmup, a.eval_every, a.eval_batches = 60_000, 2, 2, 1
    a.device = a.device or "cuda"
    a.seq_lens = [parse_n(x) for x in a.seq_lens.split(",") if x]
    a.ckpt_min_len = parse_n(a.ckpt_min_len)
    a.quality_seq_len = parse_n(a.quality_seq_len)
    a.impls = [x for x in a.impls.split(",") if x]
    a.quality_impls = [x for x in a.quality_impls.split(",") if x]
    for x in a.impls + a.quality_impls:
        if x not in IMPLS:
            p.error(f"--impls/--quality-impls: {x!r} is not one of {', '.join(IMPLS)}")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device (use --cpu-smoke on a CPU machine)")
    return a


# ---------------------------------------------------------------------------------------------
# model, step
# ---------------------------------------------------------------------------------------------

def attn_name(impl, a) -> str:
    """The transformers attn_implementation of ``impl`` (registered on first use)."""
    from dist_sparse_attn.integrations.transformers import register
    if impl == "sdpa":
        return "sdpa"
    if impl in ("hash-local", "hash"):
        local = a.local_heads if impl == "hash-local" else 0
        return register(f"dsa-{impl}", mode="hash", bucket_size=a.bucket_size,
                        local_heads=local, local_window=a.local_window, seed=a.seed)
    return register("dsa-qk", mode="qk", keep_rate=a.keep_rate, seed=a.seed)


def build(impl, a, vocab, n_tokens, precision):
    from dist_sparse_attn.integrations.transformers import build_llama
    torch.manual_seed(a.seed)
    with torch.device(a.device):          # initialised where it trains (1B params)
        wrap = build_llama(vocab_size=vocab, n_layer=a.layers, n_embd=a.d_model,
                           n_head=a.heads, n_kv_head=a.kv_heads, intermediate_size=a.ffn,
                           head_dim=a.head_dim,
                           attn_implementation=attn_name(impl, a), rope_theta=a.rope_theta,
                           max_position_embeddings=max(n_tokens, 8192),
                           gradient_checkpointing=n_tokens >= a.ckpt_min_len,
                           dtype=torch.bfloat16 if precision == "bf16" else None)
    model = wrap.model.to(a.device).train()
    opt = wrap.configure_optimizers(0.1, a.lr, (0.9, 0.95), torch.device(a.device).type)
    return model, opt


def chunked_loss(model, hidden, targets, chunk):
    """Mean next-token CE of hidden (1, N, d) against targets (1, N): the lm_head and CE in
    chunks of tokens, each recomputed in backward, so only one chunk's logits exist."""
    w = model.lm_head.weight

    def part(h, y):
        return F.cross_entropy(F.linear(h, w).float().reshape(-1, w.shape[0]), y.reshape(-1),
                               reduction="sum")
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, hidden.shape[1], chunk):
        h, y = hidden[:, s:s + chunk], targets[:, s:s + chunk]
        total = total + (checkpoint(part, h, y, use_reentrant=False)
                         if torch.is_grad_enabled() else part(h, y))
    return total / targets.numel()


def step_loss(model, x, y, a, precision):
    pos = torch.arange(x.shape[1], device=x.device)[None]
    with torch.autocast(torch.device(a.device).type, dtype=torch.bfloat16,
                        enabled=precision == "amp"):
        hidden = model.model(input_ids=x, position_ids=pos, use_cache=False).last_hidden_state
        return chunked_loss(model, hidden, y, a.loss_chunk)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# speed
# ---------------------------------------------------------------------------------------------

def speed_run(impl, n, a):
    dev = torch.device(a.device)
    row = dict(impl=impl, seq_len=n, ckpt=n >= a.ckpt_min_len, precision=a.precision)
    model = opt = None
    try:
        model, opt = build(impl, a, a.vocab, n, a.precision)
        if dev.type == "cuda":      # the peak of training, not of the fp32 initialisation
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        gen = torch.Generator().manual_seed(a.seed + n)
        x = torch.randint(0, a.vocab, (1, n), generator=gen).to(dev)
        y = torch.randint(0, a.vocab, (1, n), generator=gen).to(dev)
        times, losses = [], []
        for i in range(a.warmup + a.steps):
            sync(dev)
            t0 = time.perf_counter()
            loss = step_loss(model, x, y, a, a.precision)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(dev)
            dt = time.perf_counter() - t0
            losses.append(float(loss.detach()))
            if i >= a.warmup:
                times.append(dt)
        med = statistics.median(times)
        row.update(status="ok", step_s=times, median_step_s=med, tokens_per_s=n / med,
                   losses=losses)
        if dev.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated(dev) / 2 ** 30
    except torch.cuda.OutOfMemoryError as e:       # noqa: PERF203 - recorded, next run
        row.update(status="oom", error=str(e).splitlines()[0])
    except Exception as e:                          # noqa: BLE001 - recorded, next run
        row.update(status="error", error=f"{type(e).__name__}: {e}"[:500])
    finally:
        del model, opt
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return row


def print_speed(rows):
    base = {r["seq_len"]: r.get("tokens_per_s") for r in rows if r["impl"] == "sdpa"}
    print(f"\n| {'impl':<11} | {'N':>5} | {'ckpt':>4} | {'tokens/s':>10} | {'step ms':>9} | "
          f"{'peak GiB':>8} | {'vs sdpa':>7} |")
    print(f"|{'-' * 13}|{'-' * 7}|{'-' * 6}|{'-' * 12}|{'-' * 11}|{'-' * 10}|{'-' * 9}|")
    for r in rows:
        if r["status"] != "ok":
            print(f"| {r['impl']:<11} | {fmt_n(r['seq_len']):>5} | {'':>4} | "
                  f"{r['status']:>10} | {'':>9} | {'':>8} | {'':>7} |")
            continue
        b = base.get(r["seq_len"])
        rel = f"{r['tokens_per_s'] / b:.2f}x" if b else "-"
        peak = f"{r['peak_gib']:.1f}" if "peak_gib" in r else "-"
        print(f"| {r['impl']:<11} | {fmt_n(r['seq_len']):>5} | {'on' if r['ckpt'] else 'off':>4} | "
              f"{r['tokens_per_s']:>10.0f} | {r['median_step_s'] * 1e3:>9.1f} | {peak:>8} | "
              f"{rel:>7} |")


# ---------------------------------------------------------------------------------------------
# quality
# ---------------------------------------------------------------------------------------------

def quality(a, result, write):
    from dist_sparse_attn.data import TokenData, stdlib_corpus
    n, dev = a.quality_seq_len, torch.device(a.device)
    data = TokenData(stdlib_corpus(a.quality_bytes), val_fraction=0.05)
    # the same training windows in the same order for every implementation
    gen = torch.Generator().manual_seed(a.seed + 1)
    train = [data.batch("train", n, 1, generator=gen) for _ in range(a.quality_steps)]
    gen = torch.Generator().manual_seed(a.seed + 2)
    val = [data.batch("val", n, 1, generator=gen) for _ in range(a.eval_batches)]
    q = result["quality"] = dict(seq_len=n, steps=a.quality_steps, vocab=256,
                                 precision=a.quality_precision, lr=a.lr,
                                 warmup=a.quality_warmup, eval_every=a.eval_every,
                                 data=f"stdlib_corpus({a.quality_bytes}) bytes", curves={})
    for impl in a.quality_impls:
        model, opt = build(impl, a, 256, n, a.quality_precision)
        curve = dict(loss=[], val_step=[], val_loss=[], step_s=[])
        q["curves"][impl] = curve
        for step, (x, y) in enumerate(train):
            for g in opt.param_groups:
                g["lr"] = a.lr * min(1.0, (step + 1) / max(1, a.quality_warmup))
            sync(dev)
            t0 = time.perf_counter()
            loss = step_loss(model, x.to(dev), y.to(dev), a, a.quality_precision)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(dev)
            curve["step_s"].append(time.perf_counter() - t0)
            curve["loss"].append(float(loss.detach()))
            if (step + 1) % a.eval_every == 0 or step + 1 == len(train):
                with torch.no_grad():
                    v = sum(float(step_loss(model, vx.to(dev), vy.to(dev), a,
                                            a.quality_precision)) for vx, vy in val) / len(val)
                curve["val_step"].append(step + 1)
                curve["val_loss"].append(v)
                print(f"quality {impl:<11} step {step + 1:>4}: train {curve['loss'][-1]:.4f} "
                      f"val {v:.4f}", flush=True)
                write()
        del model, opt
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\n| {'impl':<11} | {'train loss (last 20)':>20} | {'val loss':>8} | {'step ms':>8} |")
    print(f"|{'-' * 13}|{'-' * 22}|{'-' * 10}|{'-' * 10}|")
    for impl, c in q["curves"].items():
        tail = c["loss"][-20:]
        print(f"| {impl:<11} | {sum(tail) / len(tail):>20.4f} | {c['val_loss'][-1]:>8.4f} | "
              f"{statistics.median(c['step_s']) * 1e3:>8.1f} |")


# ---------------------------------------------------------------------------------------------

def main(argv=None):
    a = parse_args(argv)
    dev = torch.device(a.device)
    result = dict(
        config={k: v for k, v in vars(a).items() if k not in ("out",)},
        host=platform.node(), torch=torch.__version__,
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        speed=[])
    try:
        import transformers
        result["transformers"] = transformers.__version__
    except ImportError:
        sys.exit("bench_hf.py needs transformers: pip install 'dist_sparse_attn[hf]'")
    result["config"]["seq_lens"] = a.seq_lens

    def write():
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, a.out)

    if a.mode in ("speed", "both"):
        for n in a.seq_lens:
            for impl in a.impls:
                row = speed_run(impl, n, a)
                result["speed"].append(row)
                msg = (f"{row['tokens_per_s']:.0f} tokens/s" if row["status"] == "ok"
                       else f"{row['status']}: {row.get('error', '')}")
                print(f"speed {impl:<11} N={fmt_n(n):>5}: {msg}", flush=True)
                write()
        print_speed(result["speed"])
    if a.mode in ("quality", "both"):
        quality(a, result, write)
    write()
    bad = [r for r in result["speed"] if r["status"] == "error"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
