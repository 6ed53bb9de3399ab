"""CPU benchmark: hash-sparse attention vs dense causal SDPA.

    python benchmarks/bench_cpu.py                                # N=16384, 16 buckets
    python benchmarks/bench_cpu.py --seqlens 4096,8192,16384 --buckets 16,64

Times, on the CPU, float32, B=1, H=4, D=64 by default:
  * ``hash_sparse_attention(q, k, v, n_buckets)`` end to end: LSH hashing,
    stable sort by (bucket, position), tiled kernel, unsort; forward and
    forward+backward;
  * ``hash+plan``: the hashing and sorting alone (``lsh_buckets`` + ``make_plan``);
  * dense causal ``scaled_dot_product_attention`` on the same (B, N, H, D)
    tensors (transposed to (B, H, N, D) and back inside the timed region).
Each number is the median of ``--repeats`` runs after one warm-up. Effective
TFLOP/s use dense causal FLOPs (4·B·H·N²·D/2 forward, ×3.5 forward+backward,
benchmarks/README.md), so they are comparable across methods. Writes ``bench_cpu.json``
and, when matplotlib is installed, ``bench_cpu.png`` into ``--out``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

import dist_sparse_attn as dsa
from dist_sparse_attn.demo import (dense_causal_flops, fwd_and_fwdbwd_ms, hash_buckets,
                                   random_qkv, sdpa_causal, sparsity_stats, time_ms)
from dist_sparse_attn.plan import make_plan

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "runs" / "bench" / "cpu"


def _ints(s):
    return [int(x) for x in s.split(",") if x]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", type=_ints, default=[16384], help="comma-separated N")
    p.add_argument("--buckets", type=_ints, default=[16], help="comma-separated bucket counts")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per entry (>= 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per entry (>= 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--boost-priority", action="store_true",
                   help="on a shared Linux machine (as root): run in a new session whose "
                        "autogroup and threads get nice -15, so other jobs slow the timings "
                        "less")
    args = p.parse_args(argv)
    if args.repeats < 3:
        p.error("--repeats must be >= 3")
    if args.warmup < 1:
        p.error("--warmup must be >= 1")
    if any(nb < 2 or nb % 2 for nb in args.buckets):
        p.error(f"--buckets must be even integers >= 2, got {args.buckets}")
    return args


def _loadavg():
    try:
        return float(open("/proc/loadavg").read().split()[0])
    except OSError:
        return None


class OtherLoad:
    """Share of the machine's CPU time that *other* processes used over a span.

    Busy time from /proc/stat minus this process's own CPU time, divided by
    wall time x cores: 0 means the timings had the machine to themselves.
    """

    def __init__(self):
        self.t0, self.busy0, self.self0 = time.perf_counter(), self._busy(), self._self()

    @staticmethod
    def _busy():
        try:
            ticks = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        except OSError:
            return None
        idle = ticks[3] + ticks[4]                      # idle + iowait
        return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _self():
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime

    def fraction(self):
        busy = self._busy()
        if busy is None or self.busy0 is None:
            return None
        wall = time.perf_counter() - self.t0
        other = (busy - self.busy0) - (self._self() - self.self0)
        return max(0.0, other / (wall * (os.cpu_count() or 1)))


def _cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit():
    """HEAD of the checkout this script lives in, '+dirty' when the library has edits."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "dist_sparse_attn"],
                               cwd=root, capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def boost_priority() -> bool:
    """New session (own scheduler autogroup) at nice -15, before torch starts its threads.

    With ``kernel.sched_autogroup_enabled`` a plain ``nice`` only ranks threads
    within their session, so the autogroup's own nice must be raised too.
    """
    try:
        os.setsid()
    except OSError:
        pass                                # already a session/group leader
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write("-15")
    except OSError:
        pass                                # no autogroups: plain nice is enough
    try:
        os.nice(-15)
    except OSError as e:
        print(f"--boost-priority: could not raise priority ({e}); timing as is", flush=True)
        return False
    return True


def _hash_and_plan(q, k, nb):
    """The bookkeeping part of the end-to-end call: LSH buckets and the sorted plan."""
    B, N = q.shape[:2]
    pos = torch.arange(N).expand(B, N)
    qb, kb = hash_buckets(q, k, nb)
    make_plan(q, k, qb, kb, pos, pos, causal=True, include_self=True, softmax_scale=None)


def run(args):
    dev = torch.device("cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    B, H, D = args.batch, args.heads, args.dim
    rows = []
    hdr = (f"{'N':>6}  {'method':<20} {'fwd ms':>9} {'x SDPA':>7} {'fwd+bwd ms':>11} "
           f"{'x SDPA':>7} {'TFLOP/s f+b':>11} {'hash+plan ms':>12} {'tiles':>6} {'allowed':>8}")
    print(f"B={B} H={H} D={D} float32 CPU, {torch.get_num_threads()} threads, median of "
          f"{args.repeats} after {args.warmup} warm-up\n{hdr}\n{'-' * len(hdr)}", flush=True)
    for N in args.seqlens:
        q, k, v = random_qkv(B, N, H, H, D, device=dev, dtype=torch.float32, generator=gen)
        f_flops = dense_causal_flops(B, H, N, D)
        fb_flops = dense_causal_flops(B, H, N, D, backward=True)
        entries = [("sdpa_causal", None, sdpa_causal)]
        for nb in args.buckets:
            entries.append((f"hash_sparse_{nb}", nb,
                            lambda q, k, v, nb=nb: dsa.hash_sparse_attention(q, k, v, nb)))
        base = None
        for name, nb, fn in entries:
            fwd, fb = fwd_and_fwdbwd_ms(fn, q, k, v, repeats=args.repeats, warmup=args.warmup)
            row = {"N": N, "B": B, "H": H, "D": D, "method": name, "n_buckets": nb,
                   "fwd_ms": fwd, "fwd_bwd_ms": fb,
                   "fwd_tflops_eff": f_flops / fwd / 1e9, "fwd_bwd_tflops_eff": fb_flops / fb / 1e9}
            if base is None:
                base = (fwd, fb)
            row["fwd_speedup_vs_sdpa"] = base[0] / fwd
            row["fwd_bwd_speedup_vs_sdpa"] = base[1] / fb
            if nb is not None:
                with torch.no_grad():
                    row["hash_plan_ms"] = time_ms(lambda: _hash_and_plan(q, k, nb), dev,
                                                  repeats=args.repeats, warmup=args.warmup)
                row.update(sparsity_stats(q, k, *hash_buckets(q, k, nb)))
            rows.append(row)
            extra = (f"{row['hash_plan_ms']:>12.1f} {row['tiles_vs_causal']:>6.3f} "
                     f"{row['allowed_frac']:>8.3f}" if nb is not None
                     else f"{'-':>12} {'-':>6} {'-':>8}")
            print(f"{N:>6}  {name:<20} {fwd:>9.1f} {row['fwd_speedup_vs_sdpa']:>7.2f} "
                  f"{fb:>11.1f} {row['fwd_bwd_speedup_vs_sdpa']:>7.2f} "
                  f"{row['fwd_bwd_tflops_eff']:>11.4f} {extra}", flush=True)
    return rows


def plot(rows, path: Path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", flush=True)
        return None
    ns = sorted({r["N"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / len(methods)
    for ax, key, title in ((axes[0], "fwd_ms", "forward"),
                           (axes[1], "fwd_bwd_ms", "forward + backward")):
        for i, m in enumerate(methods):
            ys = [next((r[key] for r in rows if r["N"] == n and r["method"] == m), 0) for n in ns]
            xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(ns))]
            ax.bar(xs, ys, width, label=m.replace("_", " "))
        ax.set_xticks(range(len(ns)), [str(n) for n in ns])
        ax.set_xlabel("sequence length N")
        ax.set_ylabel("ms (median, lower is better)")
        ax.set_title(title)
        if len(ns) > 1:
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    B, H, D = rows[0]["B"], rows[0]["H"], rows[0]["D"]
    fig.suptitle(f"CPU ({os.cpu_count()} cores), float32, B={B} H={H} D={D}, causal: "
                 "hash-sparse vs dense SDPA")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    args = parse_args(argv)
    boosted = boost_priority() if args.boost_priority else False
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = _loadavg()
    other = OtherLoad()
    rows = run(args)
    other_frac = other.fraction()
    meta = {
        "benchmark": "bench_cpu",
        "date_utc": started.isoformat(timespec="seconds"),
        "duration_s": round((datetime.datetime.now(datetime.timezone.utc) - started)
                            .total_seconds(), 1),
        "git_commit": _git_commit(),
        "command": " ".join(shlex.quote(a) for a in [sys.executable.rsplit("/", 1)[-1],
                                                      *sys.argv]),
        "device": f"CPU, {os.cpu_count()} cores",
        "cpu": _cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__, "dist_sparse_attn": dsa.__version__,
        "python": platform.python_version(),
        "dtype": "float32", "causal": True,
        "repeats": args.repeats, "warmup": args.warmup, "statistic": "median",
        "loadavg_1min_before": load_before, "loadavg_1min_after": _loadavg(),
        "other_processes_cpu_frac": other_frac, "priority_boost": boosted,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    jpath = args.out / "bench_cpu.json"
    jpath.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {jpath}", flush=True)
    if not args.no_plot:
        ppath = plot(rows, args.out / "bench_cpu.png")
        if ppath:
            print(f"wrote {ppath}", flush=True)
    if other_frac is not None:
        print(f"other processes used {other_frac:.0%} of the CPU time during the run"
              + (": timings may be inflated" if other_frac > 0.05 else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
