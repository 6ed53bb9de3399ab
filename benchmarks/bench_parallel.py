"""Sequence-parallel strong-scaling benchmark (docs/design.md, section 3).

Each rank holds a contiguous shard of N / P tokens (B=1, H=16, D=64; bf16 on
CUDA with one GPU per rank via LOCAL_RANK and NCCL, float32 on CPU with gloo).
For every total N it times forward+backward (median over ``--iters`` after
``--warmup``; ``torch.cuda.synchronize`` + barrier around every timed step,
so a step's time is the slowest rank's) of:

  * ``bucket/hash<nb>``    ``sequence_parallel_attention(strategy="bucket")``, LSH
                           buckets from ``dsa.lsh_buckets`` on the local shard (same
                           seed on every rank), hashing inside the timed step;
  * ``bucket/qk-drop<d>``  the same strategy, QK-sparse: random keep-masks with the
                           drop rate, buckets ``where(keep, 0, -1)``;
  * ``bucket-ovl<K>/hash<nb>``, ``bucket-ovl<K>/qk-drop<d>``  the same two with the bucket
                           strategy's pipelined path, K chunks whose exchanges overlap the
                           neighbouring chunk's kernel (``--overlap-chunks``, default 2,
                           passed as ``overlap_chunks=K``; the plain ``bucket/*`` rows
                           pass 1, the unpipelined path);
  * ``ulysses/hash<nb>``   ``strategy="ulysses"`` with the same hash buckets;
  * ``allgather/qk-drop<d>`` ``strategy="allgather"`` (gathers the kept k/v), QK-sparse,
                           when the library has that strategy;
  * ``ds-ulysses/sdpa``    DeepSpeed-Ulysses ``DistributedAttention`` (heads
                           all-to-all) over dense causal SDPA (flash backend on
                           CUDA) -- only when ``import deepspeed`` works;
  * ``ring-cp/sdpa``       PyTorch context parallel (ring attention) over dense
                           causal SDPA, ``torch.distributed.tensor.experimental.
                           context_parallel`` on a 1-D DeviceMesh -- CUDA only;
  * ``single/*``           (P=1 only) the single-device calls: ``hash_sparse_attention``,
                           ``qk_sparse_attention`` and dense causal SDPA.

Reported per config: step time (ms), tokens/s per GPU, the local attention's own
time ("compute": the ``bucketed_attention`` call inside the strategy -- summed over
the chunks' calls for ``bucket-ovl*`` -- or the local SDPA of DeepSpeed-Ulysses,
forward and backward), read from ``torch.profiler`` in ``--iters`` more steps after the
timed ones (so the profiler's overhead stays out of the step times): the strategies'
``dist_sparse_attn::local_attention`` ranges and the attention's autograd backward
(``dist_sparse_attn.testing.local_attention_ms``), on GPUs the device time of their
kernels, on the CPU their wall time; "other" = step - slowest rank's compute
(exchanges, routing, hashing, sync; for ``bucket-ovl*`` only the part of the exchanges
not hidden behind a kernel; on GPUs a kernel that shares the card with a running NCCL
transfer may itself be a little slower), and the load imbalance max/mean of the ranks'
compute times (all_gather).

Rank 0 prints a table as results come and writes ``parallel_P<P>.json`` (+ a
PNG of time per method vs N when matplotlib is present) into ``--out``. Runs
for P = 1, 2, 4 are separate launches; ``--plot-only DIR`` merges every
``parallel_P*.json`` of DIR into ``scaling.json`` / ``scaling.png`` (step time
and tokens/s per GPU vs GPU count, strong-scaling efficiency
T(1) / (P * T(P)) against the same method at P=1 and against the best
single-device method of the same sparsity) and prints the merged table.

    torchrun --standalone --nproc_per_node 4 benchmarks/bench_parallel.py --out DIR \\
        [--seqlens 65536 131072 262144] [--heads 16] [--dim 64] [--buckets 16] [--drops 0.8]
    python benchmarks/bench_parallel.py --plot-only DIR
    # CPU smoke test (gloo):
    torchrun --standalone --nproc_per_node 2 benchmarks/bench_parallel.py --out /tmp/bp \\
        --seqlens 2048 --heads 4 --dim 16 --iters 2
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import re
import statistics
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F

import dist_sparse_attn as dsa
import dist_sparse_attn.parallel as dsp
from dist_sparse_attn.testing import local_attention_ms

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _dist import init_process_group  # noqa: E402  (benchmarks/_dist.py)

# ----------------------------------------------------------------------------------------
# local compute: read from the profiler ranges the library opens (no patching)

# our own range around the backward of a baseline's local attention (the library's
# backward shows up as its autograd node, see dist_sparse_attn.testing.local_attention_ms)
BASELINE_BACKWARD = "bench::local_attention_backward"


class _OpenRange(torch.autograd.Function):
    """Identity on a local attention's output; its backward runs right before the
    attention's backward: it opens the backward range."""

    @staticmethod
    def forward(ctx, span, o):
        ctx.span = span
        return o.view_as(o)

    @staticmethod
    def backward(ctx, g):
        ctx.span.append(torch.profiler.record_function(BASELINE_BACKWARD))
        ctx.span[-1].__enter__()
        return None, g


class _CloseRange(torch.autograd.Function):
    """Identity on a local attention's inputs; its backward runs right after the
    attention's backward: it closes the backward range."""

    @staticmethod
    def forward(ctx, span, *xs):
        ctx.span = span
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *grads):
        if ctx.span:
            ctx.span.pop().__exit__(None, None, None)
        return (None,) + grads


def _ranged(fn):
    """A baseline's local attention fn(q, k, v, *a, **kw) -> o with the library's
    profiler range around its forward and :data:`BASELINE_BACKWARD` around its
    backward, so that its compute is measured like the library's."""
    from dist_sparse_attn.parallel._comm import local_attention_range

    def wrapped(q, k, v, *a, **kw):
        if not torch.is_grad_enabled():
            with local_attention_range():
                return fn(q, k, v, *a, **kw)
        span = []
        q, k, v = _CloseRange.apply(span, q, k, v)
        with local_attention_range():
            o = fn(q, k, v, *a, **kw)
        return _OpenRange.apply(span, o)
    return wrapped


# ----------------------------------------------------------------------------------------
# distributed setup


def _setup(args):
    cuda = torch.cuda.is_available() and not args.cpu
    return init_process_group(cuda, args.timeout, args.threads), cuda


def _sync(cuda):
    if cuda:
        torch.cuda.synchronize()


def _all_ok(ok: bool, device) -> bool:
    """Every rank agrees whether a method worked everywhere."""
    t = torch.tensor([1.0 if ok else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0)


def _gather_float(x: float, device, P) -> list:
    t = torch.tensor([float(x)], dtype=torch.float64 if device.type == "cpu" else torch.float32,
                     device=device)
    out = [torch.empty_like(t) for _ in range(P)]
    dist.all_gather(out, t)
    return [float(o.item()) for o in out]


# ----------------------------------------------------------------------------------------
# methods: each returns (step fn -> output tensor, list of leaf inputs, optional context)


def _sdpa_local(cuda, backend_name):
    """Dense causal SDPA on (B, N, h, D), transposed to (B, h, N, D) and back."""
    ctx = None
    if cuda and backend_name != "auto":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        be = {"flash": SDPBackend.FLASH_ATTENTION,
              "cudnn": SDPBackend.CUDNN_ATTENTION,
              "efficient": SDPBackend.EFFICIENT_ATTENTION}[backend_name]
        ctx = lambda: sdpa_kernel(be)  # noqa: E731

    def attn(q, k, v, *args, **kwargs):
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        if ctx is None:
            o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
        else:
            with ctx():
                o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
        return o.transpose(1, 2)
    return attn


_DS_READY = None


def _deepspeed_attention(local_attn, cuda):
    """DeepSpeed-Ulysses DistributedAttention over the default group, or raise."""
    global _DS_READY
    import deepspeed
    import deepspeed.comm as dscomm
    from deepspeed.sequence.layer import DistributedAttention
    if _DS_READY is None:
        # torch.distributed is already initialized: deepspeed.comm wraps the default group
        dscomm.init_distributed(dist_backend="nccl" if cuda else "gloo",
                                auto_mpi_discovery=False, verbose=False)
        if not cuda:    # nothing of DeepSpeed's CPU all-reduce left in /dev/shm
            from dist_sparse_attn.distributed import release_deepspeed_shm
            release_deepspeed_shm()
        _DS_READY = deepspeed.__version__
    return DistributedAttention(local_attn, dist.group.WORLD, scatter_idx=2, gather_idx=1)


def _make_qkv(B, n, H, D, dtype, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(B, n, H, D, device=device, dtype=dtype, generator=g).requires_grad_()
            for _ in range(3)]


# ----------------------------------------------------------------------------------------


def run(args):
    device, cuda = _setup(args)
    acts = [torch.profiler.ProfilerActivity.CPU] + \
        ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    P, rank = dist.get_world_size(), dist.get_rank()
    dtype = torch.bfloat16 if cuda else torch.float32
    B, H, D = 1, args.heads, args.dim
    card = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
    is0 = rank == 0

    def say(msg):
        if is0:
            print(msg, flush=True)

    say(f"# bench_parallel: P={P} ({'NCCL' if cuda else 'gloo'}), {card}, torch {torch.__version__}, "
        f"B={B} H={H} D={D} {str(dtype).replace('torch.', '')}, fwd+bwd, median of {args.iters} "
        f"after {args.warmup} warm-up; "
        + ("" if cuda else f"{torch.get_num_threads()} thread(s)/rank; ")
        + f"compute: local attention from the profiler, {args.iters} more steps")
    hdr = (f"{'P':>2} {'N':>8} {'method':<22} {'step ms':>10} {'tok/s/GPU':>11} "
           f"{'compute ms':>10} {'other ms':>9} {'imbal':>6} {'mem GiB':>8}")
    say(hdr)
    rows = []
    notes = []

    def note(msg):
        notes.append(msg)
        say(f"# {msg}")

    def bench(N, method, make, compute_probe=False):
        """Build the inputs (make() -> (fn, leaves, ctxmgr or None)), time fwd+bwd."""
        ok, err, res = True, None, None
        try:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            fn, leaves, cm = make()
            with (cm if cm is not None else _nullcontext()):
                res = _time_steps(fn, leaves, compute_probe)
                if args.profile:
                    _profile_step(fn, leaves, f"P{P}_N{N}_{method.replace('/', '-')}")
        except Exception as e:                                   # report, keep going
            ok, err = False, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            if args.verbose:
                traceback.print_exc()
        if not _all_ok(ok, device):
            note(f"N={N} {method} failed"
                 + (f" on rank {rank}: {err}" if err else " on another rank"))
            if not ok and not is0:
                print(f"# [rank {rank}] N={N} {method} failed: {err}", flush=True)
            if cuda:
                torch.cuda.empty_cache()
            return
        step_ms, local_ms, comp_ms = res
        steps = _gather_float(step_ms, device, P)
        comps = _gather_float(comp_ms if comp_ms is not None else float("nan"), device, P)
        locs = _gather_float(local_ms, device, P)
        mem = torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else None
        mems = _gather_float(mem if mem is not None else float("nan"), device, P)
        step = max(steps)              # identical up to clock noise: barrier-bounded
        r = dict(P=P, N=N, method=method, step_ms=step, tokens_per_s_per_gpu=N / (step * 1e-3) / P,
                 local_ms_per_rank=locs, card=card, dtype=str(dtype), B=B, H=H, D=D)
        if comp_ms is not None:
            mean_c = sum(comps) / P
            r.update(compute_ms_per_rank=comps, compute_ms_max=max(comps), compute_ms_mean=mean_c,
                     other_ms=step - max(comps),
                     imbalance=(max(comps) / mean_c) if mean_c > 0 else None)
        if cuda:
            r["peak_mem_gib_max"] = max(mems)
        rows.append(r)
        c = f"{r['compute_ms_max']:10.2f}" if comp_ms is not None else f"{'':>10}"
        o = f"{r['other_ms']:9.2f}" if comp_ms is not None else f"{'':>9}"
        im = (f"{r['imbalance']:6.3f}" if comp_ms is not None and r.get("imbalance") else f"{'':>6}")
        mm = f"{r['peak_mem_gib_max']:8.2f}" if cuda else f"{'':>8}"
        say(f"{P:>2} {N:>8} {method:<22} {step:10.2f} {r['tokens_per_s_per_gpu']:11.0f} {c} {o} {im} {mm}")

    def _time_steps(fn, leaves, compute_probe):
        """Median step and local times over the timed steps; with ``compute_probe``,
        then the median local attention time of as many steps under torch.profiler
        (separate steps: the profiler's overhead stays out of the step times)."""
        grad = None
        local, step_t, comp = [], [], []
        for it in range(args.warmup + 2 * args.iters if compute_probe
                        else args.warmup + args.iters):
            for x in leaves:
                x.grad = None
            profiled = it >= args.warmup + args.iters
            _sync(cuda)
            dist.barrier()
            _sync(cuda)
            prof = torch.profiler.profile(activities=acts) if profiled else None
            if prof is not None:
                prof.__enter__()
            t0 = time.perf_counter()
            out = fn()
            if grad is None:
                with torch.no_grad():
                    g = torch.Generator(device=device).manual_seed(1234 + rank)
                    grad = torch.randn(out.shape, dtype=out.dtype, device=device, generator=g)
            out.backward(grad)
            _sync(cuda)
            t1 = time.perf_counter()
            if prof is not None:
                prof.__exit__(None, None, None)
                comp.append(local_attention_ms(prof, cuda=cuda,
                                               extra_ranges=(BASELINE_BACKWARD,)))
            dist.barrier()
            _sync(cuda)
            t2 = time.perf_counter()
            if args.warmup <= it and not profiled:
                local.append((t1 - t0) * 1e3)
                step_t.append((t2 - t0) * 1e3)
            del out
        return (statistics.median(step_t), statistics.median(local),
                statistics.median(comp) if compute_probe else None)

    def _profile_step(fn, leaves, tag):
        """One more fwd+bwd under torch.profiler; rank 0 writes the top operators by
        device (CPU: host) self time to OUT/profile_<tag>.txt -- where "other" goes."""
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        for x in leaves:
            x.grad = None
        _sync(cuda)
        dist.barrier()
        with profile(activities=acts) as prof:
            out = fn()
            out.backward(torch.ones_like(out))
            _sync(cuda)
        dist.barrier()
        if is0:
            key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, f"profile_{tag}.txt"), "w") as f:
                f.write(prof.key_averages().table(sort_by=key, row_limit=35))

    want = set(args.methods) if args.methods else None

    def wanted(m):
        return want is None or m in want or m.split("/")[0] in want

    have_ds = None
    if any(wanted(m) for m in ("ds-ulysses/sdpa",)):
        try:
            import deepspeed  # noqa: F401
            have_ds = deepspeed.__version__
        except Exception as e:
            note(f"ds-ulysses skipped: import deepspeed failed ({type(e).__name__}: {e})")

    for N in args.seqlens:
        if N % P:
            note(f"N={N} skipped: not divisible by P={P}")
            continue
        n = N // P
        seed = args.seed * 1000 + rank            # this rank's shard of the global sequence

        for nb in args.buckets:
            def make_hash(strategy, nb=nb, chunks=1):
                q, k, v = _make_qkv(B, n, H, D, dtype, device, seed)

                def fn():
                    with torch.no_grad():
                        qb = dsa.lsh_buckets(q, nb, seed=args.hash_seed)
                        kb = dsa.lsh_buckets(k, nb, seed=args.hash_seed)
                    return dsp.sequence_parallel_attention(q, k, v, qb, kb, strategy=strategy,
                                                           overlap_chunks=chunks)
                return fn, [q, k, v], None

            if wanted(f"bucket/hash{nb}"):
                bench(N, f"bucket/hash{nb}", lambda: make_hash("bucket"), True)
            for K in args.overlap_chunks:
                if wanted(f"bucket-ovl{K}/hash{nb}"):
                    bench(N, f"bucket-ovl{K}/hash{nb}",
                          lambda K=K: make_hash("bucket", chunks=K), True)
            if wanted(f"ulysses/hash{nb}"):
                if H % P:
                    note(f"ulysses/hash{nb} skipped: P={P} does not divide H={H}")
                else:
                    bench(N, f"ulysses/hash{nb}", lambda: make_hash("ulysses"), True)
            if P == 1 and wanted(f"single/hash{nb}"):
                def make_single_hash(nb=nb):
                    q, k, v = _make_qkv(B, n, H, D, dtype, device, seed)
                    return (lambda: dsa.hash_sparse_attention(q, k, v, nb, seed=args.hash_seed),
                            [q, k, v], None)
                bench(N, f"single/hash{nb}", make_single_hash)

        for drop in args.drops:
            tag = f"qk-drop{round(drop * 100)}"

            def make_keep(drop=drop):
                q, k, v = _make_qkv(B, n, H, D, dtype, device, seed)
                g = torch.Generator(device=device).manual_seed(seed + 7)
                kq = torch.rand(B, n, H, device=device, generator=g) >= drop
                kk = torch.rand(B, n, H, device=device, generator=g) >= drop
                return q, k, v, kq, kk

            def make_qk_strategy(strat, chunks=1):
                q, k, v, kq, kk = make_keep()
                qb, kb = dsa.keep_to_buckets(kq), dsa.keep_to_buckets(kk)

                def fn():
                    return dsp.sequence_parallel_attention(q, k, v, qb, kb, strategy=strat,
                                                           overlap_chunks=chunks)
                return fn, [q, k, v], None

            # "allgather" (gather the kept k/v) where this version of the library has it
            for strat in [s for s in ("bucket", "allgather") if s in dsp.STRATEGIES]:
                if wanted(f"{strat}/{tag}"):
                    bench(N, f"{strat}/{tag}", lambda strat=strat: make_qk_strategy(strat),
                          True)
                if strat == "bucket":
                    for K in args.overlap_chunks:
                        if wanted(f"bucket-ovl{K}/{tag}"):
                            bench(N, f"bucket-ovl{K}/{tag}",
                                  lambda K=K: make_qk_strategy("bucket", K), True)
            if P == 1 and wanted(f"single/{tag}"):
                def make_qk_single():
                    q, k, v, kq, kk = make_keep()
                    return lambda: dsa.qk_sparse_attention(q, k, v, kq, kk), [q, k, v], None
                bench(N, f"single/{tag}", make_qk_single)

        # ---- dense baselines -------------------------------------------------------------
        sdpa = _sdpa_local(cuda, args.sdpa_backend)
        if have_ds and wanted("ds-ulysses/sdpa"):
            if H % P:
                note(f"ds-ulysses/sdpa skipped: P={P} does not divide H={H}")
            else:
                def make_ds():
                    attn = _deepspeed_attention(_ranged(sdpa), cuda)
                    q, k, v = _make_qkv(B, n, H, D, dtype, device, seed)
                    return lambda: attn(q, k, v, 0), [q, k, v], None
                bench(N, "ds-ulysses/sdpa", make_ds, True)
        if wanted("ring-cp/sdpa"):
            if not cuda and not args.ring_on_cpu:
                if not any(x.startswith("ring-cp/sdpa skipped") for x in notes):
                    note("ring-cp/sdpa skipped: CUDA only (context_parallel dispatches to the "
                         "CUDA flash/efficient SDPA ops)")
            else:
                def make_ring():
                    from torch.distributed.device_mesh import init_device_mesh
                    from torch.distributed.tensor.experimental import context_parallel
                    mesh = init_device_mesh(device.type, (P,))
                    if args.ring_rotate:
                        from torch.distributed.tensor.experimental._attention import \
                            set_rotate_method
                        set_rotate_method(args.ring_rotate)
                    # global (B, H, N, D) buffers, identical on every rank; the context
                    # shards them in place along N (with its causal load balancing)
                    g = torch.Generator(device=device).manual_seed(args.seed)
                    bufs = [torch.randn(B, H, N, D, device=device, dtype=dtype, generator=g)
                            for _ in range(3)]
                    cm = context_parallel(mesh, buffers=bufs, buffer_seq_dims=[2, 2, 2],
                                          no_restore_buffers=set(bufs))
                    leaves = []

                    def fn():
                        if not leaves:       # inside the context: the shards
                            leaves.extend(b.detach().requires_grad_() for b in bufs)
                        return sdpa(*(x.transpose(1, 2) for x in leaves))
                    return fn, leaves, cm
                bench(N, "ring-cp/sdpa", make_ring)
        if P == 1 and wanted("single/sdpa"):
            def make_single_sdpa():
                q, k, v = _make_qkv(B, n, H, D, dtype, device, seed)
                return lambda: sdpa(q, k, v), [q, k, v], None
            bench(N, "single/sdpa", make_single_sdpa)

    meta = dict(P=P, card=card, torch=torch.__version__, backend="nccl" if cuda else "gloo",
                dtype=str(dtype), deepspeed=have_ds, sdpa_backend=args.sdpa_backend,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                host=platform.node(), argv=sys.argv, args=vars(args), notes=notes)
    if is0:
        os.makedirs(args.out, exist_ok=True)
        name = os.path.join(args.out, f"parallel_P{P}.json")
        with open(name, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        png = plot_single(rows, args.out, P)
        print(f"# wrote {name}" + (f" and {png}" if png else ""), flush=True)
    dist.barrier()
    dist.destroy_process_group()


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


# ----------------------------------------------------------------------------------------
# plots and the merge of several P


def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def plot_single(rows, out, P):
    plt = _plt()
    if plt is None or not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 5))
    for m in sorted({r["method"] for r in rows}):
        pts = sorted((r["N"], r["step_ms"]) for r in rows if r["method"] == m)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("total sequence length N")
    ax.set_ylabel("fwd+bwd step ms (median)")
    ax.set_title(f"P={P}, {rows[0]['card']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    name = os.path.join(out, f"parallel_P{P}.png")
    fig.savefig(name, dpi=110)
    plt.close(fig)
    return name


def _family(method):
    """The single-device method of the same sparsity (the strong-scaling reference)."""
    kind = method.split("/", 1)[1]
    return "single/sdpa" if kind == "sdpa" else f"single/{kind}"


def plot_only(d):
    files = sorted(glob.glob(os.path.join(d, "parallel_P*.json")),
                   key=lambda f: int(re.findall(r"P(\d+)", os.path.basename(f))[0]))
    if not files:
        sys.exit(f"no parallel_P*.json in {d}")
    rows, metas = [], []
    for f in files:
        with open(f) as fh:
            j = json.load(fh)
        rows += j["rows"]
        metas.append(j["meta"])
    cards = sorted({m["card"] for m in metas})
    if len(cards) > 1:
        print(f"# WARNING: runs on different cards: {cards}")
    t = {(r["method"], r["N"], r["P"]): r["step_ms"] for r in rows}
    for r in rows:
        t1 = t.get((r["method"], r["N"], 1))
        r["eff_vs_same_P1"] = t1 / (r["P"] * r["step_ms"]) if t1 else None
        ts = t.get((_family(r["method"]), r["N"], 1))
        r["eff_vs_single"] = ts / (r["P"] * r["step_ms"]) if ts else None
        r["speedup_vs_single"] = ts / r["step_ms"] if ts else None
    print(f"# merged {', '.join(os.path.basename(f) for f in files)}; cards: {', '.join(cards)}")
    print("# eff = T(P=1) / (P * T(P)); 'vs single' uses the single-device call of the same "
          "sparsity at P=1")
    print(f"{'N':>8} {'method':<22} {'P':>2} {'step ms':>10} {'tok/s/GPU':>11} {'imbal':>6} "
          f"{'eff(same)':>9} {'eff(single)':>11} {'x single':>8}")
    f2 = lambda x, w, p=3: f"{x:{w}.{p}f}" if x is not None else f"{'':>{w}}"  # noqa: E731
    for r in sorted(rows, key=lambda r: (r["N"], r["method"], r["P"])):
        print(f"{r['N']:>8} {r['method']:<22} {r['P']:>2} {r['step_ms']:10.2f} "
              f"{r['tokens_per_s_per_gpu']:11.0f} {f2(r.get('imbalance'), 6)} "
              f"{f2(r['eff_vs_same_P1'], 9)} {f2(r['eff_vs_single'], 11)} "
              f"{f2(r['speedup_vs_single'], 8, 2)}")
    name = os.path.join(d, "scaling.json")
    with open(name, "w") as fh:
        json.dump({"metas": metas, "rows": rows}, fh, indent=1)
    plt = _plt()
    if plt is not None:
        Ns = sorted({r["N"] for r in rows})
        methods = sorted({r["method"] for r in rows})
        cmap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
        colors = {m: cmap(i % cmap.N) for i, m in enumerate(methods)}
        fig, axes = plt.subplots(3, len(Ns), figsize=(5 * len(Ns), 12), squeeze=False)
        for c, N in enumerate(Ns):
            sel = [r for r in rows if r["N"] == N]
            Ps = sorted({r["P"] for r in sel})
            for m in sorted({r["method"] for r in sel}):
                pts = sorted(((r["P"], r) for r in sel if r["method"] == m), key=lambda x: x[0])
                xs = [p for p, _ in pts]
                style = dict(marker="o", label=m, color=colors[m],
                             linestyle="--" if m.startswith("single") else "-")
                axes[0][c].plot(xs, [r["step_ms"] for _, r in pts], **style)
                axes[1][c].plot(xs, [r["tokens_per_s_per_gpu"] for _, r in pts], **style)
                e = [(p, r["eff_vs_same_P1"]) for p, r in pts if r["eff_vs_same_P1"] is not None]
                if e and not m.startswith("single"):
                    axes[2][c].plot([a for a, _ in e], [b for _, b in e], **style)
            for ax, yl in zip((axes[0][c], axes[1][c], axes[2][c]),
                              ("fwd+bwd step ms", "tokens/s per GPU",
                               "strong-scaling efficiency T1/(P*TP)")):
                ax.set_xscale("log", base=2)
                ax.set_xticks(Ps)
                ax.set_xticklabels([str(p) for p in Ps])
                ax.set_xlabel("GPUs (P)")
                ax.set_ylabel(yl)
                ax.grid(True, which="both", alpha=0.3)
            axes[0][c].set_yscale("log")
            axes[1][c].set_yscale("log")
            axes[2][c].axhline(1.0, color="k", lw=0.5)
            axes[0][c].set_title(f"N={N}")
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"sequence-parallel strong scaling ({', '.join(cards)})")
        fig.tight_layout()
        png = os.path.join(d, "scaling.png")
        fig.savefig(png, dpi=100)
        plt.close(fig)
        print(f"# wrote {name} and {png}")
    else:
        print(f"# wrote {name} (no matplotlib: no plot)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="runs/bench/parallel")
    p.add_argument("--plot-only", metavar="DIR", help="merge DIR/parallel_P*.json, plot, exit")
    p.add_argument("--seqlens", type=int, nargs="+", default=[65536, 131072, 262144],
                   help="total sequence lengths N (each rank holds N / P)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--buckets", type=int, nargs="+", default=[16])
    p.add_argument("--drops", type=float, nargs="+", default=[0.8])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--methods", nargs="+", default=None,
                   help="subset, e.g. bucket bucket-ovl2 ulysses/hash16 ds-ulysses ring-cp "
                        "single")
    p.add_argument("--overlap-chunks", type=int, nargs="*", default=[2],
                   help="chunk counts K of the bucket-ovl<K>/* rows (the bucket strategy's "
                        "pipelined path); none: no such rows")
    p.add_argument("--sdpa-backend", default="flash", choices=["flash", "cudnn", "efficient", "auto"],
                   help="SDPA backend of the dense baselines on CUDA (default flash)")
    p.add_argument("--ring-rotate", choices=["allgather", "alltoall"], default=None,
                   help="context_parallel's KV rotation (default: torch's, allgather)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hash-seed", type=int, default=0)
    p.add_argument("--timeout", type=int, default=900, help="collective timeout, seconds")
    p.add_argument("--cpu", action="store_true", help="gloo on CPU even when CUDA is present")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank on CPU")
    p.add_argument("--ring-on-cpu", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    p.add_argument("--profile", action="store_true",
                   help="also profile one step per method: OUT/profile_P<P>_N<N>_<method>.txt")
    args = p.parse_args()
    if any(k < 2 for k in args.overlap_chunks):
        p.error(f"--overlap-chunks: every K must be >= 2 (1 is the bucket/* rows), got "
                f"{args.overlap_chunks}")
    if args.plot_only:
        plot_only(args.plot_only)
        return
    run(args)


if __name__ == "__main__":
    main()
