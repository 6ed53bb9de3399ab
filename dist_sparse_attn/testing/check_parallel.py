"""Correctness check of the sequence-parallel strategies on several GPUs (NCCL, bf16, long N).

Run by ``benchmarks/check_parallel_gpu.py`` (the command line: it starts one process
per GPU, ``LOCAL_RANK`` and NCCL, and calls :func:`run`); with ``--device cpu`` the
same logic runs on gloo at small sizes (CI, ``tests/parallel/test_check_parallel.py``).

For every case, every rank builds the same full inputs q (B, N, H, D), k, v
(B, N, Hkv, D) and the upstream gradient g (B, N, H, D) from a seeded device
generator (a fingerprint of the raw bits is compared across ranks), takes its
contiguous shard (lengths N // P or N // P + 1), runs forward + backward
(of sum(o * g)) through the strategy, and the output and q/k/v gradient shards
are gathered on rank 0. Rank 0 computes the single-device result on the full
tensors, on its own device, with the same buckets / keep-masks and dtype
(``hash_sparse_attention``, ``qk_sparse_attention`` or ``bucketed_attention``,
whose kernels are checked against the float64 oracle in ``tests/``), plus a
high-precision run (float32 for bf16/fp16 inputs; float64 with the PyTorch
backend for float32 on the CPU; none for float32 on CUDA).

Cases (H = --heads, D = --dim, B = --batch, nb = --buckets):
    hash16         LSH buckets (``sequence_parallel_hash_attention``), Hkv = H
    hash16-gqa     the same with Hkv = --gqa-kv-heads (default H // 4, at least 2)
    hash16-skewed  LSH buckets, then half the tokens (all their heads) forced into bucket 0
    hash16-noself  LSH buckets, include_self=False
    hash16-uneven  LSH buckets at N - 3 tokens (or fewer, until P does not divide it):
                   uneven shard lengths for every P > 1
    qk80           QK-sparse, 80% of the (token, head) items dropped
                   (``sequence_parallel_qk_attention``)
    dense          every bucket 0: causal dense attention
each with the strategies bucket (``--overlap-chunks K``: its pipelined path), ulysses
(when P divides H and Hkv; otherwise skipped) and allgather.

Tolerances. The parallel run and the single-device run compute the same
thing in the same dtype with different summation orders (other tiles, other
key blocks; in allgather the dk/dv partial sums of the ranks are rounded to
the dtype and all-reduced), so both carry the dtype's own rounding error e
(bf16: unit roundoff 2**-8 = 3.9e-3 per rounding, e ~ 2-5e-3 relative L2 for
outputs and gradients, measured below as the single-device run's error
against the high-precision run), and they differ by about sqrt(2) e, at most
2e. For every tensor t in (o, dq, dk, dv) a case passes when
    * t is finite everywhere (no NaN / inf), and so is the single-device t_1;
    * ||t_par - t_1|| <= rtol * ||t_1||           (bf16: 2e-2, several times 2e);
    * max|t_par - t_1| <= max_tol * max|t_1|      (bf16: 5e-2, 6-13 bf16 ulps at the
      tensor's largest magnitude; catches a few wrong rows that the norm dilutes);
    * against the high-precision run t_hi: ||t_par - t_hi|| <= 2 ||t_1 - t_hi|| +
      floor * ||t_hi|| and max|t_par - t_hi| <= 2 max|t_1 - t_hi| + max_floor *
      max|t_hi|: the parallel result is no worse than the single-device one within 2x
      (floors, for errors near zero; bf16: 1e-3 and 2**-7, 1-2 ulps).
For the bucket strategy on the skewed case the per-rank compute load is also
reported: cost = sum over the rank's groups of n_q * n_k (what the LPT
assignment balances, :func:`~dist_sparse_attn.testing.bucket_costs`) and the local
kernel's forward time in a second, no-grad call (read from the profiler range
``dist_sparse_attn::local_attention``); imbalance = max / mean over ranks (not a pass
criterion).

Rank 0 prints a table (rel err: the worst tensor's relative L2 error against the
single-device run; max err, par/hi, 1dev/hi: the largest max-error, the parallel and
the single-device relative L2 error against the high-precision run, over o, dq, dk,
dv; imbal: cost / time imbalance) and writes ``DIR/check_parallel_P<P>.json``; the exit
code is 1 on every rank when any case failed.

    torchrun --standalone --nproc_per_node 4 benchmarks/check_parallel_gpu.py --out DIR
    torchrun --standalone --nproc_per_node 4 benchmarks/check_parallel_gpu.py --out DIR \\
        --seqlen 32768 65536
    # CPU (gloo), small:
    torchrun --standalone --nproc_per_node 2 benchmarks/check_parallel_gpu.py --out DIR \\
        --device cpu --seqlen 2048 --heads 4 --dim 16 --dtype float32

``--perturb EPS`` scales the last rank's output shard by (1 + EPS) before the
backward: a self-test that the checker sees errors on ranks other than 0 (the
run must then fail).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import traceback

import torch
import torch.distributed as dist

from .. import bucketed_attention, hash_sparse_attention, lsh_buckets, qk_sparse_attention
from .. import parallel as dsp
from . import bucket_costs, local_attention_ms

STRATEGIES = ("bucket", "ulysses", "allgather")
CASE_NAMES = ("hash16", "hash16-gqa", "hash16-skewed", "hash16-noself", "hash16-uneven",
              "qk80", "dense")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# dtype -> (rtol, max_tol, rel floor, max floor); see the module docstring
TOLERANCES = {torch.bfloat16: (2e-2, 5e-2, 1e-3, 2 ** -7),
              torch.float16: (4e-3, 1e-2, 2e-4, 2 ** -10),
              torch.float32: (1e-4, 1e-3, 1e-6, 1e-5)}
TENSORS = ("o", "dq", "dk", "dv")


# ----------------------------------------------------------------------------------------
# cases


def uneven_length(N, P):
    """N - 3, or the next smaller length that P does not divide (P > 1)."""
    n = N - 3
    while P > 1 and n % P == 0:
        n -= 1
    return n


def case_specs(args, P):
    """name -> dict(kind, N, Hkv, include_self, ...) at total length N."""
    H, nb = args.heads, args.buckets
    specs = {}
    for N in args.seqlen:
        sfx = "" if len(args.seqlen) == 1 else f"@{N}"
        specs.update({
            f"hash16{sfx}": dict(kind="hash", N=N, Hkv=H, nb=nb),
            f"hash16-gqa{sfx}": dict(kind="hash", N=N, Hkv=args.gqa_kv_heads, nb=nb),
            f"hash16-skewed{sfx}": dict(kind="skewed", N=N, Hkv=H, nb=nb),
            f"hash16-noself{sfx}": dict(kind="hash", N=N, Hkv=H, nb=nb, include_self=False),
            f"hash16-uneven{sfx}": dict(kind="hash", N=uneven_length(N, P), Hkv=H,
                                         nb=nb),
            f"qk80{sfx}": dict(kind="qk", N=N, Hkv=H, drop=0.8),
            f"dense{sfx}": dict(kind="dense", N=N, Hkv=H),
        })
    if args.cases:
        specs = {k: v for k, v in specs.items() if k.split("@")[0] in args.cases}
    return specs


def build_inputs(spec, args, device, dtype, seed):
    """Full inputs, identical on every rank: q, k, v, g and the bucket / keep tensors."""
    B, N, H, Hkv, D = args.batch, spec["N"], args.heads, spec["Hkv"], args.dim
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):      # drawn in float32, rounded to dtype (as tests/helpers.rand_qkv)
        return torch.randn(*shape, generator=gen, device=device).to(dtype)
    q, k, v, g = randn(B, N, H, D), randn(B, N, Hkv, D), randn(B, N, Hkv, D), randn(B, N, H, D)
    x = {"q": q, "k": k, "v": v, "g": g}
    kind = spec["kind"]
    if kind in ("hash", "skewed"):
        x["qb"] = lsh_buckets(q, spec["nb"], seed=args.hash_seed, group_size=H // Hkv)
        x["kb"] = lsh_buckets(k, spec["nb"], seed=args.hash_seed)
        if kind == "skewed":    # half the tokens, with all their heads, into bucket 0
            hot = torch.rand(B, N, 1, generator=gen, device=device) < 0.5
            x["qb"] = torch.where(hot, 0, x["qb"])
            x["kb"] = torch.where(hot, 0, x["kb"])
    elif kind == "qk":
        x["q_keep"] = torch.rand(B, N, H, generator=gen, device=device) >= spec["drop"]
        x["k_keep"] = torch.rand(B, N, Hkv, generator=gen, device=device) >= spec["drop"]
    elif kind == "dense":
        x["qb"] = torch.zeros(B, N, H, dtype=torch.long, device=device)
        x["kb"] = torch.zeros(B, N, Hkv, dtype=torch.long, device=device)
    return x


def single_device(spec, x, args, dtype, backend):
    """(o, dq, dk, dv) of the single-device op on the full tensors in ``dtype``."""
    leaves = [x[n].detach().to(dtype).requires_grad_(True) for n in ("q", "k", "v")]
    kind, incl = spec["kind"], spec.get("include_self", True)
    if kind == "hash" and dtype == x["q"].dtype:
        o = hash_sparse_attention(*leaves, spec["nb"], seed=args.hash_seed,
                                  include_self=incl, backend=backend)
    elif kind == "qk":
        o = qk_sparse_attention(*leaves, x["q_keep"], x["k_keep"], backend=backend)
    else:   # explicit buckets (the high-precision hash run uses the low-precision buckets)
        o = bucketed_attention(*leaves, x["qb"], x["kb"], include_self=incl,
                               backend=backend)
    grads = torch.autograd.grad(o, leaves, x["g"].to(dtype), allow_unused=True)
    grads = [torch.zeros_like(lf) if gr is None else gr for lf, gr in zip(leaves, grads)]
    return [o.detach()] + [gr.detach() for gr in grads]


def parallel_call(spec, shard, strategy, args, backend):
    """o of the sequence-parallel op on this rank's shard."""
    q, k, v = shard["q"], shard["k"], shard["v"]
    kind, incl = spec["kind"], spec.get("include_self", True)
    kw = dict(strategy=strategy, backend=backend, overlap_chunks=args.overlap_chunks)
    if kind == "hash":
        return dsp.sequence_parallel_hash_attention(q, k, v, spec["nb"], seed=args.hash_seed,
                                                    include_self=incl, **kw)
    if kind == "qk":
        return dsp.sequence_parallel_qk_attention(q, k, v, shard["q_keep"], shard["k_keep"],
                                                  **kw)
    return dsp.sequence_parallel_attention(q, k, v, shard["qb"], shard["kb"],
                                           include_self=incl, **kw)


# ----------------------------------------------------------------------------------------
# distributed helpers


def shard_lengths(N, P):
    return [N // P + (1 if r < N % P else 0) for r in range(P)]


def gather_seq(x, lengths, device):
    """This rank's (B, n_r, ...) -> the full (B, N, ...) on every rank (padded all_gather)."""
    m = max(lengths)
    pad = x.new_zeros((x.shape[0], m) + tuple(x.shape[2:]))
    pad[:, :x.shape[1]] = x
    parts = [torch.empty_like(pad) for _ in lengths]
    dist.all_gather(parts, pad.contiguous())
    return torch.cat([p[:, :n] for p, n in zip(parts, lengths)], 1)


def fingerprint(tensors, device):
    """int64 sums of the raw bits (plain and position-weighted) of every tensor."""
    out = []
    for t in tensors:
        t = t.contiguous().flatten()
        if t.dtype == torch.bool:
            t = t.to(torch.uint8)
        if t.is_floating_point():
            t = t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
        t = t.long()
        w = torch.arange(t.numel(), device=t.device) % 251 + 1
        out += [t.sum(), (t * w).sum()]
    return torch.stack(out).to(device)


def all_same(t, device) -> bool:
    rows = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, t)
    return all(torch.equal(r, rows[0]) for r in rows)


def all_ok(ok: bool, device) -> bool:
    t = torch.tensor([1 if ok else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def sync(cuda):
    if cuda:
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------
# load of the bucket strategy


def measure_load(fn, q_buckets, k_buckets, device, cuda):
    """(cost per rank, local attention forward ms per rank) of the bucket strategy:
    the costs from the whole sequence's buckets, the time of this rank's local
    attention in ``fn()`` from the profiler, gathered over ranks."""
    from torch.profiler import ProfilerActivity, profile
    P = dist.get_world_size()
    costs = bucket_costs(q_buckets, k_buckets, P)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        fn()
        sync(cuda)
    t = torch.tensor([local_attention_ms(prof, cuda=cuda, backward=False)],
                     dtype=torch.float64, device=device)
    rows = [torch.empty_like(t) for _ in range(P)]
    dist.all_gather(rows, t)
    return costs, [float(r[0]) for r in rows]


def imbalance(xs):
    mean = sum(xs) / len(xs)
    return max(xs) / mean if mean > 0 else 1.0


# ----------------------------------------------------------------------------------------
# comparison (rank 0)


def compare(par, one, hi, dtype):
    """Per tensor metrics and verdicts of the parallel result against the single-device
    one (and both against the high-precision run when there is one)."""
    rtol, max_tol, floor, max_floor = TOLERANCES[dtype]
    out, ok = {}, True
    for name, a, e, h in zip(TENSORS, par, one, hi if hi is not None else [None] * 4):
        a64, e64 = a.double(), e.double()
        ref = torch.linalg.vector_norm(e64).item()
        scale = e64.abs().max().item()
        d = a64 - e64
        m = dict(finite=bool(torch.isfinite(a).all()), ref_finite=bool(torch.isfinite(e).all()),
                 rel=torch.linalg.vector_norm(d).item() / ref if ref > 0
                 else torch.linalg.vector_norm(d).item(),
                 max=d.abs().max().item() / scale if scale > 0 else d.abs().max().item())
        del d
        checks = [m["finite"], m["ref_finite"], m["rel"] <= rtol, m["max"] <= max_tol]
        if h is not None:
            h64 = h.double()
            href = torch.linalg.vector_norm(h64).item()
            hscale = h64.abs().max().item()
            m["rel_par_hi"] = torch.linalg.vector_norm(a64 - h64).item() / max(href, 1e-30)
            m["rel_one_hi"] = torch.linalg.vector_norm(e64 - h64).item() / max(href, 1e-30)
            m["max_par_hi"] = (a64 - h64).abs().max().item() / max(hscale, 1e-30)
            m["max_one_hi"] = (e64 - h64).abs().max().item() / max(hscale, 1e-30)
            del h64
            checks += [m["rel_par_hi"] <= 2 * m["rel_one_hi"] + floor,
                       m["max_par_hi"] <= 2 * m["max_one_hi"] + max_floor]
        m["pass"] = all(checks)
        ok &= m["pass"]
        out[name] = m
        del a64, e64
    return ok, out


# ----------------------------------------------------------------------------------------


def run(args, device) -> int:
    """Every case and strategy on the default process group (started by the caller,
    one rank per ``device``); rank 0 prints the table and writes the report. Returns
    the exit code: 0 when every run passed, else 1, the same on every rank."""
    cuda = device.type == "cuda"
    P, rank = dist.get_world_size(), dist.get_rank()
    dtype = DTYPES[args.dtype]
    backend = args.backend
    if args.no_high_precision:
        hi_dtype = None
    elif dtype == torch.float32:    # float64 with the PyTorch backend, CPU only (slow on GPU)
        hi_dtype = None if cuda else torch.float64
    else:
        hi_dtype = torch.float32
    hi_backend = "torch" if hi_dtype == torch.float64 else backend
    is0 = rank == 0
    card = torch.cuda.get_device_name(device) if cuda else (platform.processor() or "cpu")
    t_start = time.perf_counter()

    def say(msg=""):
        if is0:
            print(msg, flush=True)

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    say(f"# check_parallel_gpu: P={P} ({'NCCL' if cuda else 'gloo'}), {card}, "
        f"torch {torch.__version__}, triton {triton_version}, B={args.batch} H={args.heads} "
        f"D={args.dim} {args.dtype}, backend={backend}, overlap_chunks={args.overlap_chunks}, "
        f"high precision: "
        f"{str(hi_dtype).replace('torch.', '') if hi_dtype else 'none'}")
    say(f"# tolerances ({args.dtype}): rtol, max_tol, floor, max_floor = {TOLERANCES[dtype]}")
    hdr = (f"{'case':<18} {'strategy':<9} {'P':>2} {'N':>6} {'H/Hkv':>6} {'worst':>5} "
           f"{'rel err':>9} {'max err':>9} {'par/hi':>9} {'1dev/hi':>9} {'imbal':>11} "
           f"{'s':>6}  result")
    say(hdr)
    say("-" * len(hdr))
    rows = []
    specs = case_specs(args, P)
    for ci, (name, spec) in enumerate(specs.items()):
        N, H, Hkv = spec["N"], args.heads, spec["Hkv"]
        lengths = shard_lengths(N, P)
        lo, hi_ = sum(lengths[:rank]), sum(lengths[:rank + 1])
        x = build_inputs(spec, args, device, dtype, args.seed + ci)
        same = all_same(fingerprint(list(x.values()), device), device)
        refs = refs_hi = None
        if is0 and same:
            t0 = time.perf_counter()
            refs = single_device(spec, x, args, dtype, backend)
            refs_hi = single_device(spec, x, args, hi_dtype, hi_backend) if hi_dtype else None
            sync(cuda)
            say(f"# {name}: N={N} shards {lengths}, single-device runs "
                f"{time.perf_counter() - t0:.1f} s")
        for strategy in args.strategies:
            row = dict(case=name, strategy=strategy, P=P, N=N, B=args.batch, H=H, Hkv=Hkv,
                       D=args.dim, dtype=args.dtype, shard_lengths=lengths, kind=spec["kind"],
                       include_self=spec.get("include_self", True))
            t0 = time.perf_counter()
            if not same:
                row.update(status="fail", error="inputs differ between ranks (fingerprint)")
            elif strategy == "ulysses" and (H % P or Hkv % P):
                row.update(status="skipped", error=f"P={P} does not divide H={H} / Hkv={Hkv}")
            else:
                gathered = None
                try:
                    shard = {n: t[:, lo:hi_].contiguous() for n, t in x.items()}
                    leaves = [shard[n].detach().requires_grad_(True) for n in ("q", "k", "v")]
                    shard.update(zip(("q", "k", "v"), leaves))
                    o = parallel_call(spec, shard, strategy, args, backend)
                    if args.perturb and rank == P - 1:
                        o = o * (1 + args.perturb)
                    grads = torch.autograd.grad(o, leaves, shard["g"], allow_unused=True)
                    grads = [torch.zeros_like(lf) if gr is None else gr
                             for lf, gr in zip(leaves, grads)]
                    sync(cuda)
                    row["step_s"] = time.perf_counter() - t0
                    gathered = [gather_seq(t.detach(), lengths, device)
                                for t in [o] + grads]
                    del o, grads, leaves
                    if not is0:
                        gathered = None
                    if spec["kind"] == "skewed" and strategy == "bucket":
                        def fwd():
                            with torch.no_grad():
                                parallel_call(spec, shard, strategy, args, backend)
                        costs, ms = measure_load(fwd, x["qb"], x["kb"], device, cuda)
                        row.update(cost_per_rank=costs, kernel_fwd_ms_per_rank=ms,
                                   cost_imbalance=imbalance(costs),
                                   time_imbalance=imbalance(ms))
                    del shard
                except Exception:   # noqa: BLE001 - recorded; raised on every rank
                    row.update(status="fail", error=traceback.format_exc())
                if is0 and "error" not in row:
                    try:
                        ok, metrics = compare(gathered, refs, refs_hi, dtype)
                        row.update(status="pass" if ok else "fail", tensors=metrics)
                    except Exception:   # noqa: BLE001 - recorded
                        row.update(status="fail", error=traceback.format_exc())
                del gathered
                row.setdefault("status", "done")    # ranks > 0: nothing to compare here
            row["wall_s"] = time.perf_counter() - t0
            rows.append(row)
            if is0:
                print(format_row(row), flush=True)
                if row["status"] == "fail" and row.get("error"):
                    print(row["error"], flush=True)
        del x, refs, refs_hi
        if cuda:
            torch.cuda.empty_cache()

    failed = [f"{r['case']}/{r['strategy']}" for r in rows if r["status"] == "fail"]
    ok = all_ok(not failed, device)
    total_s = time.perf_counter() - t_start
    say(f"# {len(rows)} runs, {sum(r['status'] == 'pass' for r in rows)} passed, "
        f"{sum(r['status'] == 'skipped' for r in rows)} skipped, {len(failed)} failed"
        + (f": {', '.join(failed)}" if failed else "") + f"; {total_s:.1f} s")
    if is0:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"check_parallel_P{P}.json")
        meta = dict(P=P, backend_dist="nccl" if cuda else "gloo", device=card,
                    torch=torch.__version__, triton=triton_version, python=sys.version.split()[0],
                    commit=_commit(), date=datetime.datetime.now().isoformat(timespec="seconds"),
                    args=vars(args), tolerances={str(k).replace("torch.", ""): v
                                                 for k, v in TOLERANCES.items()},
                    high_precision=str(hi_dtype).replace("torch.", "") if hi_dtype else None,
                    total_s=total_s, passed=ok)
        with open(path, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        say(f"# wrote {path}")
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


def format_row(r):
    t = r.get("tensors")
    if t:
        worst = max(TENSORS, key=lambda n: t[n]["rel"])
        rel = f"{t[worst]['rel']:.2e}"
        mx = f"{max(m['max'] for m in t.values()):.2e}"
        if "rel_par_hi" in t["o"]:
            ph = f"{max(m['rel_par_hi'] for m in t.values()):.2e}"
            oh = f"{max(m['rel_one_hi'] for m in t.values()):.2e}"
        else:
            ph = oh = "-"
    else:
        worst, rel, mx, ph, oh = "-", "-", "-", "-", "-"
    imb = (f"{r['cost_imbalance']:.2f}/{r['time_imbalance']:.2f}"
           if "cost_imbalance" in r else "-")
    res = r["status"].upper() if r["status"] != "skipped" else f"skipped ({r['error']})"
    if r["status"] == "fail" and t:
        res += " (" + ", ".join(n for n in TENSORS if not t[n]["pass"]) + ")"
    return (f"{r['case']:<18} {r['strategy']:<9} {r['P']:>2} {r['N']:>6} "
            f"{r['H']:>3}/{r['Hkv']:<2} {worst:>5} {rel:>9} {mx:>9} {ph:>9} {oh:>9} "
            f"{imb:>11} {r['wall_s']:>6.1f}  {res}")


def _commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() \
            or None
    except Exception:   # noqa: BLE001 - no git: no commit recorded
        return None


def _at_least(lo: int):
    """argparse type: an integer >= lo (a bad value is a usage error, exit 2, not a
    traceback with the exit code of a failed check)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {value}")
        return value
    parse.__name__ = f"integer >= {lo}"
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="directory for check_parallel_P<P>.json")
    p.add_argument("--seqlen", type=_at_least(8), nargs="+", default=[32768],
                   help="total tokens N (several: every case at each; e.g. 32768 65536)")
    p.add_argument("--heads", type=_at_least(1), default=16)
    p.add_argument("--gqa-kv-heads", type=_at_least(1), default=None,
                   help="Hkv of the GQA case (default H // 4, at least 2: 4 for H=16)")
    p.add_argument("--dim", type=_at_least(1), default=64)
    p.add_argument("--batch", type=_at_least(1), default=1)
    p.add_argument("--buckets", type=_at_least(2), default=16, help="LSH buckets of the hash cases")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--device", choices=("cuda", "cpu"),
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto")
    p.add_argument("--cases", nargs="+", choices=CASE_NAMES, default=None,
                   help="a subset of the cases (default: all)")
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    p.add_argument("--overlap-chunks", type=_at_least(1), default=1,
                   help="the bucket strategy's pipeline chunks (overlap_chunks; 1: the "
                        "unpipelined path)")
    p.add_argument("--seed", type=_at_least(0), default=1234)
    p.add_argument("--hash-seed", type=_at_least(0), default=7)
    p.add_argument("--threads", type=_at_least(1), default=1, help="torch threads per rank (CPU)")
    p.add_argument("--timeout", type=_at_least(1), default=300, help="process-group timeout, s")
    p.add_argument("--no-high-precision", action="store_true",
                   help="skip the float32 reference run: the parallel result is then held to "
                        "the dtype's tolerances against the single-device run only (on a "
                        "fresh GPU machine Triton compiles the float32 kernels for 40+ s per "
                        "case)")
    p.add_argument("--perturb", type=float, default=0.0,
                   help="self-test: scale the last rank's output by (1 + PERTURB)")
    args = p.parse_args(argv)
    if args.gqa_kv_heads is None:
        args.gqa_kv_heads = max(args.heads // 4, min(2, args.heads))
    if args.heads % args.gqa_kv_heads:
        p.error("--gqa-kv-heads must divide --heads")
    if args.buckets % 2:
        p.error(f"--buckets must be even (angular LSH), got {args.buckets}")
    return args
