"""End-to-end training benchmark of the GPT-2-small-shaped model (12 layers, 12 heads,
d=768, byte vocabulary, bf16): throughput, loss at equal steps, retrieval, longest
sequence -- every number from the real training entry point
(``python -m dist_sparse_attn.train``), one subprocess per run.

Suites (``--suite``, comma list or ``all``):

  speed1    1 GPU. Dense SDPA (flash, cuDNN), hash-sparse (8/16/32 buckets; 16 with 4
            block-local heads; hash16 and dense cuDNN also replayed from CUDA graphs),
            QK-sparse (30/50/70 % dropped) at 16k, 64k and 8k tokens:
            a short run each (10 steps, median step time after 2 warm-up steps, one eval
            batch at the end, no checkpoints, no retrieval eval).
  quality1  1 GPU. Equal-step loss curves of dense-cuDNN, hash16 with 4 block-local
            heads, hash16 and qk-drop50 at 16k tokens (200 steps, eval every 25,
            train.retrieval_mix 0.2) and the long-range retrieval accuracy at the end.
  speed4    4 GPUs, one sequence over all four (sequence parallelism). Dense
            DeepSpeed-Ulysses (sp_strategy=ds-ulysses, SDPA cuDNN / flash) vs the
            library's strategies (bucket: hash 16/32/64 buckets, hash 64 with local
            heads, qk-drop50; ulysses: hash 64) at 128k and 64k.
  longest1  1 GPU, the longest sequences: activation checkpointing, chunked MLP and
            loss (64k tokens), the attention-free floor (``floor``: attention="none",
            the same model and step with no token mixing) beside hash-sparse with
            n_buckets = N / 512, with and without offloading the checkpoints to host
            memory (``-off``), N = 256k, 1M, 2M, 4M; each config stops at its first
            failure. The table gives every run's step time over the floor's.
  longest4  4 GPUs, activation checkpointing, hash-sparse with n_buckets = N / 512
            (fixed expected bucket size), N doubling 256k -> 4M, 4 steps each; stops at
            the first failure (OOM, timeout, error). Records step time and peak memory.
            Runs with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True unless the
            variable is set. Measured on 4 H100s: 1M at 16.5 GiB, 2M at 37.6 GiB per
            GPU; 4M trains one step, then runs out of memory (add
            ``--extra-set model.mlp_chunk=65536``, not yet measured);
            ``--max-buckets`` caps n_buckets (larger buckets instead).

Config names (``--configs``): ``dense-<backend>`` (backend auto/flash/cudnn/efficient/math),
``dsu-<backend>`` (dense over DeepSpeed-Ulysses; several GPUs), ``hash<nb>``,
``hash-b<size>`` (n_buckets = N / size, even), ``hash<nb>-loc<k>`` (the last k kv heads
block-local, ``model.local_heads``), ``qk-drop<percent dropped>``, ``floor`` (attention
"none": the attention-free floor); suffixes ``-cap<r>`` (``model.bucket_cap=r``),
``-off`` (``model.offload_checkpoints``, with activation checkpointing) and ``-graph``
(``model.cuda_graph``: the step replayed from CUDA graphs); prefix
``ulysses-`` / ``allgather-`` selects the library's other sequence-parallel strategies.

Every run has its own directory ``OUT/<suite>/<config>_N<len>/`` (the entry point's
summary.json, metrics.jsonl, config.json) and log ``OUT/<suite>/<config>_N<len>.log``;
a run that fails (OOM, error) or passes its wall-clock limit (the whole process tree
is killed) is recorded with the reason and the suite goes on. ``OUT/train_<suite>.json``
is rewritten after every run; at the end a markdown table (also ``train_<suite>.md``)
and PNGs (``train_<suite>.png``). ``--budget-s`` stops starting runs when the time is
spent. An existing ``train_<suite>.json`` keeps its runs of configs not planned now;
``--resume`` also keeps its successful runs of planned ones and runs only the rest.
``--configs``, ``--seqlens``, ``--steps``, ``--budget-s`` and ``--run-timeout`` take
``VALUE`` (every suite) or ``SUITE=VALUE`` (one suite; repeat the flag).

    # one GPU (from the repository root)
    python benchmarks/bench_train.py --suite speed1 --out OUT
    python benchmarks/bench_train.py --suite quality1 --steps 300 --out OUT
    # four GPUs
    python benchmarks/bench_train.py --suite speed4,longest4 --out OUT --budget-s 480
    # rebuild tables and plots from OUT/train_*.json
    python benchmarks/bench_train.py --plot-only OUT
    # CPU smoke test: tiny model, short sequences
    python benchmarks/bench_train.py --suite speed1 --device cpu --seqlens 512 --steps 5 \\
        --configs dense-cudnn,hash8,qk-drop50 --extra-set model.n_layer=2 \\
        --extra-set model.n_embd=64 --extra-set model.n_head=4 --out /tmp/bt
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time

from dist_sparse_attn.distributed import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SUITES = {
    "speed1": dict(
        world=1, preset="configs/gpt2_small_16k.toml",
        configs=["dense-cudnn", "dense-flash", "hash8", "hash16", "hash32", "hash16-loc4",
                 "hash16-graph", "hash16-loc4-graph", "dense-cudnn-graph", "qk-drop30",
                 "qk-drop50", "qk-drop70"],
        core=["dense-cudnn", "dense-flash", "hash16", "hash16-loc4", "hash16-graph",
              "hash16-loc4-graph", "hash32"],
        seqlens=[16384, 65536, 8192], steps=10, timeout=180, warmup_excluded=2),
    "quality1": dict(
        world=1, preset="configs/gpt2_small_16k.toml",
        configs=["dense-cudnn", "hash16-loc4", "hash16", "qk-drop50"], core=None,
        seqlens=[16384], steps=200, timeout=420, warmup_excluded=2),
    "speed4": dict(
        world=4, preset="configs/gpt2_small_128k_sp4.toml",
        configs=["dsu-cudnn", "dsu-flash", "hash16", "hash32", "hash64", "ulysses-hash64",
                 "hash64-loc4", "qk-drop50"],
        core=["dsu-cudnn", "dsu-flash", "hash64", "ulysses-hash64"],
        seqlens=[131072, 65536], steps=10, timeout=240, warmup_excluded=2),
    "longest4": dict(
        world=4, preset="configs/gpt2_small_128k_sp4.toml",
        configs=["hash-b512"], core=None,
        seqlens=[2 ** 18, 2 ** 19, 2 ** 20, 2 ** 21, 2 ** 22], steps=4, timeout=360,
        warmup_excluded=1, long=True,
        # measured at 4M tokens on 4 H100s: the default allocator failed in step 1 with
        # 10.5 GiB reserved but free; with expandable segments step 1 trained
        env={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}),
    "longest1": dict(
        world=1, preset="configs/gpt2_small_16k.toml",
        configs=["floor", "hash-b512", "floor-off", "hash-b512-off"], core=None,
        seqlens=[2 ** 18, 2 ** 20, 2 ** 21, 2 ** 22], steps=4, timeout=420,
        warmup_excluded=1, long=True,
        sets=["model.mlp_chunk=65536", "model.loss_chunk=65536"],
        env={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}),
}
ALL = ["speed1", "quality1", "speed4", "longest4", "longest1"]
BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                "NVSHMEM_DISABLE_NVLS": "1"}


class Interrupted(Exception):
    """SIGTERM / SIGINT: kill the current run, write what we have, exit."""


def _on_signal(signum, _frame):
    raise Interrupted(signal.Signals(signum).name)


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------

def parse_n(text) -> int:
    """'16384', '16k', '1M' -> tokens (k = 1024, M = 2**20)."""
    t = str(text).strip().lower()
    mult = {"k": 2 ** 10, "m": 2 ** 20}.get(t[-1:], 1)
    return int(float(t[:-1] if mult > 1 else t) * mult)


def fmt_n(n: int) -> str:
    if n >= 2 ** 20 and n % 2 ** 20 == 0:
        return f"{n // 2 ** 20}M"
    if n >= 2 ** 10 and n % 2 ** 10 == 0:
        return f"{n // 2 ** 10}k"
    return str(n)


def fmt_rate(x) -> str:
    if x is None:
        return "-"
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


def fmt(x, spec=".1f", none="-") -> str:
    return none if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def scoped(values, suite: str, default):
    """Value of a ``VALUE`` / ``SUITE=VALUE`` option for ``suite`` (scoped beats unscoped)."""
    out = default
    for v in values or []:
        head, sep, rest = str(v).partition("=")
        if not (sep and head in SUITES):
            out = v
    for v in values or []:
        head, sep, rest = str(v).partition("=")
        if sep and head == suite:
            out = rest
    return out


def atomic_json(path: str, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _sh(cmd, timeout=10):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              cwd=REPO).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def environment(args) -> dict:
    from importlib import metadata
    vers = {}
    for pkg in ("torch", "triton", "deepspeed"):
        try:
            vers[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            vers[pkg] = None
    commit = _sh(["git", "rev-parse", "--short", "HEAD"])
    dirty = bool(_sh(["git", "status", "--porcelain", "--untracked-files=no"]))
    gpus = _sh(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"])
    return {"host": platform.node(), "python": platform.python_version(), **vers,
            "commit": commit + ("+dirty" if dirty and commit else ""),
            "gpus": [g.strip() for g in gpus.splitlines() if g.strip()],
            "device_arg": args.device, "argv": sys.argv[1:],
            "TORCH_CUDA_ARCH_LIST": _child_env(args).get("TORCH_CUDA_ARCH_LIST")}


def _child_env(args) -> dict:
    env = dict(os.environ)
    if env.get("TORCH_CUDA_ARCH_LIST", "") in ("", "9.0a"):
        env["TORCH_CUDA_ARCH_LIST"] = "9.0"          # DeepSpeed op builds
    env.update(NO_MULTICAST)                         # never NVLink multicast
    pp = env.get("PYTHONPATH", "")
    if REPO not in pp.split(os.pathsep):
        env["PYTHONPATH"] = REPO + (os.pathsep + pp if pp else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


_CUDA = None


def cuda_count() -> int:
    """GPUs this benchmark may use: nvidia-smi (no CUDA context in this process), else torch."""
    global _CUDA
    if _CUDA is None:
        listed = _sh(["nvidia-smi", "-L"])
        if listed:
            _CUDA = sum(ln.startswith("GPU ") for ln in listed.splitlines())
            vis = os.environ.get("CUDA_VISIBLE_DEVICES")
            if vis is not None:
                _CUDA = min(_CUDA, len([v for v in vis.split(",") if v.strip()]))
        else:
            try:
                import torch
                _CUDA = torch.cuda.device_count() if torch.cuda.is_available() else 0
            except Exception:       # noqa: BLE001 - no torch / broken driver: no GPU
                _CUDA = 0
    return _CUDA


# ---------------------------------------------------------------------------------------------
# configurations
# ---------------------------------------------------------------------------------------------

def config_sets(name: str, seq_len: int, world: int, cpu: bool, max_buckets: int = 0):
    """--set overrides for a config name; returns (sets, info)."""
    strategy, base = "bucket", name
    for s in ("ulysses", "allgather", "bucket"):
        if name.startswith(s + "-"):
            strategy, base = s, name[len(s) + 1:]
    info = {"kind": None, "baseline": False}
    suffix_sets = []
    while True:     # -off (offload checkpoints), -cap<r> (bucket cap), -graph; any order
        m = re.fullmatch(r"(.+)-(off|graph|cap\d+(?:\.\d+)?)", base)
        if not m:
            break
        base, suffix = m.group(1), m.group(2)
        if suffix == "graph":
            info["cuda_graph"] = True
            suffix_sets.append("model.cuda_graph=true")
        elif suffix == "off":
            info["offload"] = True
            suffix_sets.append("model.offload_checkpoints=true")
        else:
            info["bucket_cap"] = float(suffix[3:])
            suffix_sets.append(f"model.bucket_cap={float(suffix[3:])}")
    m = re.fullmatch(r"(dense|dsu)-(\w+)", base)
    if base == "floor":
        info.update(kind="floor")
        sets = ["model.attention=none"]
    elif m:
        backend = m.group(2)
        if backend not in BACKENDS:
            raise ValueError(f"{name}: SDPA backend must be one of {BACKENDS}")
        if m.group(1) == "dsu":
            strategy = "ds-ulysses"
        eff = "auto" if cpu and backend in ("flash", "cudnn") else backend
        if world > 1 and strategy != "ds-ulysses":     # the library's kernels, not SDPA
            eff = "auto"
        info.update(kind="dense", baseline=True, sdpa_backend=eff)
        if eff != backend:
            info["note"] = f"sdpa {backend}->auto" + (" on CPU" if world == 1 or
                                                      strategy == "ds-ulysses" else "")
        sets = ["model.attention=dense", f"model.sdpa_backend={eff}"]
    elif re.fullmatch(r"hash\d+(-loc\d+)?", base):
        nb_text, _, loc = base[4:].partition("-loc")
        nb = int(nb_text)
        info.update(kind="hash", n_buckets=nb)
        sets = ["model.attention=hash", f"model.n_buckets={nb}"]
        if loc:     # the last <loc> kv heads block-local (model.local_window, default 512)
            info["local_heads"] = int(loc)
            sets.append(f"model.local_heads={int(loc)}")
    elif re.fullmatch(r"hash-b\d+", base):
        size = int(base[6:])
        nb = max(2, seq_len // size)
        nb += nb % 2
        if max_buckets and nb > max_buckets:
            nb = max(2, max_buckets - max_buckets % 2)
        info.update(kind="hash", n_buckets=nb)
        sets = ["model.attention=hash", f"model.n_buckets={nb}"]
    elif re.fullmatch(r"qk-drop\d+", base):
        drop = int(base[7:])
        if not 0 <= drop < 100:
            raise ValueError(f"{name}: drop percent must be in [0, 100)")
        info.update(kind="qk", qk_keep_rate=round(1 - drop / 100, 4))
        sets = ["model.attention=qk", f"model.qk_keep_rate={1 - drop / 100:.4f}"]
    else:
        raise ValueError(f"unknown config {name!r}: use dense-<backend>, dsu-<backend>, "
                         "hash<nb>[-loc<k>], hash-b<bucket size>, qk-drop<percent>, floor, "
                         "with optional suffixes -cap<r>, -off, -graph")
    sets += suffix_sets
    if world > 1:
        sets.append(f"train.sp_strategy={strategy}")
    info["sp_strategy"] = strategy if world > 1 else None
    return sets, info


_CORPUS = None


def data_sets(seq_len: int, out: str, default_bytes: int = 4_000_000):
    """--set overrides so both splits hold a window of seq_len + 1 tokens: 4 MB of the
    stdlib corpus up to ~360k tokens; beyond, more of it and a larger val fraction; a
    repeated copy of the corpus in OUT/_data when the stdlib is too small."""
    need = seq_len + 2
    if 10 * need * 1.1 <= default_bytes:
        return [f"train.max_bytes={default_bytes}"]
    global _CORPUS
    if _CORPUS is None:
        sys.path.insert(0, REPO)
        from dist_sparse_attn.data import stdlib_files
        _CORPUS = sum(os.path.getsize(p) for p in stdlib_files())
    want = max(default_bytes, int(4.4 * need))
    if _CORPUS >= int(2.2 * need) + 1:
        mb = min(_CORPUS, want)
        vf = min(0.5, max(0.1, 1.1 * need / mb))
        return [f"train.max_bytes={mb}", f"train.val_fraction={vf:.4f}"]
    path = os.path.join(out, "_data", f"stdlib_x{want}.txt")
    if not os.path.exists(path):
        import torch
        from dist_sparse_attn.data import stdlib_corpus
        os.makedirs(os.path.dirname(path), exist_ok=True)
        raw = stdlib_corpus(_CORPUS).to(torch.uint8).numpy().tobytes()
        with open(path + ".tmp", "wb") as f:
            f.write((raw * (want // len(raw) + 1))[:want])
        os.replace(path + ".tmp", path)
    vf = min(0.5, max(0.1, 1.1 * need / want))
    return [f"train.data={path}", f"train.max_bytes={want}", f"train.val_fraction={vf:.4f}"]


def suite_sets(suite: str, steps: int, args) -> list[str]:
    spec = SUITES[suite]
    # a benchmark run replaces its config's earlier run (train.overwrite)
    common = [f"train.steps={steps}", "train.save_checkpoint=false", "train.overwrite=true",
              "train.timeout_min=5",
              f"train.warmup_steps_excluded={spec['warmup_excluded']}"]
    if suite == "quality1":
        return common + [f"train.eval_interval={args.eval_every}", "train.eval_iters=4",
                         f"train.log_interval={args.log_every}",
                         f"train.retrieval_mix={args.retrieval_mix}",
                         f"train.retrieval_samples={args.retrieval_samples}"]
    sets = common + ["train.eval_interval=0", "train.eval_iters=1",
                     "train.retrieval_samples=0", "train.retrieval_mix=0", "train.log_interval=1"]
    if spec["world"] > 1:
        sets += ["train.sequence_parallel=0"]
    sets.append(f"model.activation_checkpointing={'true' if spec.get('long') else 'false'}")
    return sets + list(spec.get("sets", ()))


def extra_sets(args, suite: str) -> list[str]:
    out = []
    for s in args.extra_set:
        head, sep, rest = s.partition(":")
        if sep and head in SUITES:
            if head == suite:
                out.append(rest)
        else:
            out.append(s)
    return out


# ---------------------------------------------------------------------------------------------
# running one configuration
# ---------------------------------------------------------------------------------------------

def _descendants(pid: int) -> list[int]:
    children = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for d in entries:
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, stack = [], [pid]
    while stack:
        for c in children.get(stack.pop(), []):
            out.append(c)
            stack.append(c)
    return out


def _signal_all(pids, root, sig):
    try:
        os.killpg(root, sig)
    except (ProcessLookupError, PermissionError):
        pass
    for p in pids:
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass


def kill_tree(proc: subprocess.Popen, grace: float = 10.0):
    """SIGTERM the run's whole tree (torchrun's workers sit in sessions of their own, so
    the tree is read from /proc, not only the process group), then SIGKILL what is left."""
    pids = set(_descendants(proc.pid))
    _signal_all(pids, proc.pid, signal.SIGTERM)
    t0 = time.time()
    while time.time() - t0 < grace and proc.poll() is None:
        time.sleep(0.2)
    pids |= set(_descendants(proc.pid))
    _signal_all(pids, proc.pid, signal.SIGKILL)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    t0 = time.time()                # let the GPU memory go before the next run starts
    while time.time() - t0 < 10 and any(os.path.exists(f"/proc/{p}") and
                                        not _zombie(p) for p in pids):
        time.sleep(0.2)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


OOM_RE = re.compile(r"out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED|"
                    r"cudaErrorMemoryAllocation|std::bad_alloc", re.I)
ERR_RE = re.compile(r"(\w+(Error|Exception)\b.*|configuration error.*|error:.*)")
BOILER = ("ChildFailedError", "torch.distributed.elastic", "Traceback", "raise ", "File \"",
          "warnings.warn", "[WARNING]", "UserWarning", "FutureWarning", "DeprecationWarning")


def diagnose(log_path: str, timed_out: bool, rc):
    """(status, reason, error line, last log lines) of a run that did not finish."""
    try:
        with open(log_path, errors="replace") as f:
            lines = [ln.rstrip() for ln in f.read().splitlines() if ln.strip()]
    except OSError:
        lines = []
    tail = lines[-15:]
    oom = [ln for ln in lines if OOM_RE.search(ln)]
    errs = [ln.strip() for ln in lines if ERR_RE.search(ln) and not any(b in ln for b in BOILER)]
    err = (oom[0] if oom else errs[-1] if errs else "").strip()[:400]
    if timed_out:
        status = "timeout"
    elif oom:
        status = "oom"
    elif any("configuration error" in ln for ln in lines):
        status = "config_error"
    else:
        status = "error"
    return status, err, tail


def read_metrics(path: str):
    train, evals = [], []
    try:
        with open(path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if "loss" in r:
                    train.append(r)
                elif "eval_loss" in r:
                    evals.append(r)
    except OSError:
        pass
    return train, evals


def run_one(job: dict, args, deadline: float) -> dict:
    """Run one job (a dict from plan()) with a wall-clock limit; return its record."""
    rec = {k: job[k] for k in RUN_KEYS}
    rec.update(job["info"])
    os.makedirs(job["out_dir"], exist_ok=True)
    for stale in ("summary.json", "metrics.jsonl"):
        try:
            os.remove(os.path.join(job["out_dir"], stale))
        except FileNotFoundError:
            pass
    timeout = max(1.0, min(job["timeout"], deadline - time.time()))
    rec.update(out_dir=os.path.relpath(job["out_dir"], args.out),
               log=os.path.relpath(job["log"], args.out), cmd=shlex.join(job["cmd"]),
               timeout_s=round(timeout), started=datetime.datetime.now().isoformat(timespec="seconds"))
    t0 = time.time()
    timed_out, interrupted = False, None
    with open(job["log"], "w") as log:
        log.write(f"# {rec['cmd']}\n# cwd {REPO}, timeout {timeout:.0f} s\n")
        log.flush()
        proc = subprocess.Popen(job["cmd"], cwd=REPO, env=job["env"], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_tree(proc)
            rc = proc.returncode
        except Interrupted as e:
            interrupted = str(e)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)     # finish the clean-up first
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            kill_tree(proc, grace=3)
            rc = proc.returncode
    rec["wall_s"] = round(time.time() - t0, 1)
    rec["rc"] = rc
    summary_path = os.path.join(job["out_dir"], "summary.json")
    train, evals = read_metrics(os.path.join(job["out_dir"], "metrics.jsonl"))
    if rc == 0 and os.path.exists(summary_path):
        with open(summary_path) as f:
            s = json.load(f)
        rec["status"] = "ok"
        for k in ("median_step_ms", "tokens_per_s", "tokens_per_step", "peak_mem_gib_per_gpu",
                  "final_eval_loss", "final_train_loss", "retrieval_accuracy", "n_params",
                  "device", "sp", "dp", "wall_s"):
            rec["train_" + k if k == "wall_s" else k] = s.get(k)
        if rec.get("tokens_per_s"):
            rec["tokens_per_s_per_gpu"] = rec["tokens_per_s"] / job["world"]
        excl = SUITES[job["suite"]]["warmup_excluded"]
        timed = [r["step_ms"] for r in train if r["step"] > excl and "step_ms" in r]
        if timed and len(timed) <= 64:
            rec["step_ms_timed"] = [round(x, 2) for x in timed]
        if rec.get("median_step_ms") and rec.get("train_wall_s"):
            rec["overhead_s"] = round(rec["wall_s"] - steps_time(train, rec), 1)
    else:
        status, err, tail = diagnose(job["log"], timed_out, rc)
        if interrupted:
            status, err = "interrupted", f"benchmark got {interrupted}"
        rec.update(status=status, reason=err or f"exit code {rc}", log_tail=tail)
        if timed_out:
            rec["reason"] = f"timeout after {timeout:.0f} s" + (f"; last error: {err}" if err else "")
        if train:        # partial progress of a failed or killed run
            rec["steps_done"] = train[-1]["step"]
    if job["suite"] == "quality1" or not rec.get("status") == "ok":
        rec["curve_train"] = [[r["step"], round(r["loss"], 5)] for r in train]
        rec["curve_eval"] = [[r["step"], round(r["eval_loss"], 5)] for r in evals]
    if interrupted:
        rec["_interrupted"] = True
    return rec


def steps_time(train, rec) -> float:
    """Seconds spent in the logged steps (for the per-run overhead estimate)."""
    ms = [r["step_ms"] for r in train if "step_ms" in r]
    if len(ms) == rec.get("steps"):
        return sum(ms) / 1e3
    return rec["median_step_ms"] * rec["steps"] / 1e3


# ---------------------------------------------------------------------------------------------
# plan and run the suites
# ---------------------------------------------------------------------------------------------

def plan(suite: str, args, cpu: bool) -> list[dict]:
    spec = SUITES[suite]
    cfgs = scoped(args.configs, suite, None)
    cfgs = [c.strip() for c in cfgs.split(",") if c.strip()] if cfgs else list(spec["configs"])
    lens = scoped(args.seqlens, suite, None)
    lens = [parse_n(x) for x in lens.split(",") if x.strip()] if lens else list(spec["seqlens"])
    steps = int(scoped(args.steps, suite, spec["steps"]))
    timeout = float(scoped(args.run_timeout, suite, spec["timeout"]))
    world = spec["world"] if spec["world"] == 1 else args.nproc
    if spec.get("long"):
        order = [(n, c) for c in cfgs for n in lens]
    else:
        core = [c for c in cfgs if spec["core"] and c in spec["core"]] if args.order == "core-first" else []
        order = [(n, c) for n in lens for c in core]
        order += [(n, c) for n in lens for c in cfgs if c not in core]
    preset = args.config or spec["preset"]
    env = _child_env(args)
    for name, value in spec.get("env", {}).items():     # the suite's defaults; the caller's win
        env.setdefault(name, value)
    jobs = []
    for n, c in order:
        sets, info = config_sets(c, n, world, cpu, args.max_buckets)
        if world > 1 and c.startswith("dense-"):
            info["note"] = (info.get("note", "") + "; library bucket strategy, one bucket").lstrip("; ")
        all_sets = (suite_sets(suite, steps, args) + [f"train.seq_len={n}"]
                    + data_sets(n, args.out) + sets + extra_sets(args, suite))
        rid = f"{c}_N{n}"
        out_dir = os.path.join(args.out, suite, rid)
        if world == 1:
            launch = [sys.executable, "-m", "dist_sparse_attn.train"]
        elif args.launcher == "torchrun":
            launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                      "--nproc_per_node", str(world), "launch/train.py"]
        else:
            launch = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(world),
                      "--master_port", str(free_port()), "launch/train.py"]
        cmd = launch + ["--config", preset, "--out", out_dir, "--device", args.device]
        for s in all_sets:
            cmd += ["--set", s]
        jobs.append(dict(suite=suite, config=c, seq_len=n, world=world, steps=steps, id=rid,
                         extra_sets=extra_sets(args, suite), preset=preset, info=info,
                         out_dir=out_dir, log=os.path.join(args.out, suite, rid + ".log"),
                         cmd=cmd, env=env, timeout=timeout))
    return jobs


# what a run record copies from its job: a kept run is matched with a planned one by
# (id, steps), and counts as the same measurement only with the same overrides
RUN_KEYS = ("suite", "config", "seq_len", "world", "steps", "id", "extra_sets", "preset")


def same_overrides(a: dict, b: dict) -> bool:
    """Whether two runs (or a run and a job) ran with the same --extra-set overrides and
    preset (a record from before they were recorded matches only another such record)."""
    return a.get("extra_sets") == b.get("extra_sets") and a.get("preset") == b.get("preset")


def baselines_of(runs) -> list[str]:
    seen = []
    for r in runs:
        if r.get("baseline") and r["config"] not in seen:
            seen.append(r["config"])
    # cuDNN first (the primary baseline), then flash, then the rest
    return sorted(seen, key=lambda c: (0 if "cudnn" in c else 1 if "flash" in c else 2, c))


def speedups(r, runs) -> dict:
    out = {}
    if r.get("status") != "ok" or not r.get("tokens_per_s"):
        return out
    for b in baselines_of(runs):
        if b == r["config"]:
            continue
        base = [x for x in runs if x["config"] == b and x["seq_len"] == r["seq_len"]
                and x.get("status") == "ok" and x.get("tokens_per_s") and same_overrides(x, r)]
        if base:
            out[b] = r["tokens_per_s"] / base[0]["tokens_per_s"]
    return out


def progress_line(r, runs) -> str:
    head = f"[bench] {r['suite']:<8} N={fmt_n(r['seq_len']):>5} {r['config']:<14}"
    if r.get("kind") == "hash" and r["config"].startswith(("hash-b",)):
        head += f" (nb {r['n_buckets']})"
    if r.get("status") != "ok":
        return f"{head} {r['status'].upper():<8} {r.get('reason', '')[:200]} (wall {r.get('wall_s', 0):.0f} s)"
    sp = " ".join(f"x{v:.2f} {k}" for k, v in speedups(r, runs).items())
    mem = r.get("peak_mem_gib_per_gpu")
    line = (f"{head} ok {fmt(r.get('median_step_ms'), '8.1f')} ms/step "
            f"{fmt_rate(r.get('tokens_per_s')):>7} tok/s"
            + (f" ({fmt_rate(r.get('tokens_per_s_per_gpu'))}/GPU)" if r["world"] > 1 else "")
            + (f" | {sp}" if sp else "")
            + (f" | {mem:.2f} GiB/GPU" if mem is not None else ""))
    if r["suite"] == "quality1":
        dense = _quality_ref(runs, r)
        d = ""
        if dense and dense is not r and dense.get("final_eval_loss") and r.get("final_eval_loss"):
            d = f" ({100 * (r['final_eval_loss'] / dense['final_eval_loss'] - 1):+.2f}% vs {dense['config']})"
        ret = r.get("retrieval_accuracy")
        line += (f" | eval {fmt(r.get('final_eval_loss'), '.4f')}{d}"
                 + (f", retrieval {ret:.2f}" if ret is not None else ""))
    return line + f" (wall {r['wall_s']:.0f} s)"


def _quality_ref(runs, r):
    """The dense run ``r`` is compared with: a baseline of the same length and step count
    (cuDNN first), or None."""
    ok = [x for x in runs if x.get("baseline") and x.get("status") == "ok"
          and x["seq_len"] == r["seq_len"] and x.get("steps") == r.get("steps")
          and same_overrides(x, r)]
    ok.sort(key=lambda x: 0 if "cudnn" in x["config"] else 1)
    return ok[0] if ok else None


def result_path(out, suite):
    return os.path.join(out, f"train_{suite}.json")


def run_suite(suite: str, args, cpu: bool, t_start: float) -> dict:
    jobs = plan(suite, args, cpu)
    path = result_path(args.out, suite)
    kept, done_ids = [], set()
    if os.path.exists(path):       # earlier runs of configs not planned now are kept
        try:
            with open(path) as f:
                old = json.load(f).get("runs", [])
        except (OSError, json.JSONDecodeError):
            old = []
        planned = {(j["id"], j["steps"]): j for j in jobs}
        for r in old:
            key = (r.get("id"), r.get("steps"))
            # --resume reuses an ok run only if it ran with this invocation's overrides
            if key not in planned or (args.resume and r.get("status") == "ok"
                                      and same_overrides(r, planned[key])):
                kept.append(r)
                if key in planned:
                    done_ids.add(key)
    result = {"suite": suite, "created": datetime.datetime.now().isoformat(timespec="seconds"),
              "meta": environment(args), "settings": {
                  "preset": args.config or SUITES[suite]["preset"], "world": jobs[0]["world"] if jobs else None,
                  "steps": jobs[0]["steps"] if jobs else None,
                  "warmup_steps_excluded": SUITES[suite]["warmup_excluded"],
                  "configs": list(dict.fromkeys(j["config"] for j in jobs)),
                  "seqlens": sorted({j["seq_len"] for j in jobs}),
                  "extra_sets": extra_sets(args, suite), "cpu": cpu},
              "runs": list(kept)}
    unscoped = [v for v in args.budget_s if v.partition("=")[0] not in SUITES]
    mine = [v.partition("=")[2] for v in args.budget_s if v.partition("=")[0] == suite]
    global_budget = float(unscoped[-1]) if unscoped else 0.0
    suite_budget = float(mine[-1]) if mine else 0.0
    deadline = min(t_start + global_budget if global_budget > 0 else math.inf,
                   time.time() + suite_budget if suite_budget > 0 else math.inf)
    spec = SUITES[suite]
    print(f"[bench] suite {suite}: {len(jobs)} runs ({', '.join(result['settings']['configs'])} at "
          f"{', '.join(fmt_n(n) for n in result['settings']['seqlens'])}), {jobs[0]['steps'] if jobs else 0} "
          f"steps each, world {jobs[0]['world'] if jobs else '-'}"
          + (f", {len(done_ids)} done already (--resume)" if done_ids else "")
          + (f", {len(kept) - len(done_ids)} other earlier runs kept" if len(kept) > len(done_ids) else "")
          + (f", budget left {deadline - time.time():.0f} s" if math.isfinite(deadline) else ""),
          flush=True)
    skip_reason = None
    if spec["world"] > 1 and not cpu and cuda_count() < args.nproc:
        skip_reason = f"needs {args.nproc} GPUs, this machine has {cuda_count()}"
        print(f"[bench] suite {suite}: skipped, {skip_reason}", flush=True)
    stopped = {}           # long suites: config -> why its longer runs are skipped
    for job in jobs:
        if (job["id"], job["steps"]) in done_ids:
            continue
        left = deadline - time.time()
        reason = skip_reason or stopped.get(job["config"])
        if reason is None and left < args.min_run_s:
            reason = f"budget: {max(0, left):.0f} s left < --min-run-s {args.min_run_s:.0f}"
        if reason:
            rec = {k: job[k] for k in RUN_KEYS}
            rec.update(job["info"], status="skipped", reason=reason)
            result["runs"].append(rec)
            continue
        print(f"[bench] -> {suite} N={fmt_n(job['seq_len'])} {job['config']} "
              f"(limit {min(job['timeout'], left):.0f} s; log {os.path.relpath(job['log'], args.out)})",
              flush=True)
        rec = run_one(job, args, deadline)
        interrupted = rec.pop("_interrupted", False)
        result["runs"] = [r for r in result["runs"] if r["id"] != rec["id"]] + [rec]
        result["updated"] = datetime.datetime.now().isoformat(timespec="seconds")
        atomic_json(path, result)
        print(progress_line(rec, result["runs"]), flush=True)
        if interrupted:
            raise Interrupted(rec.get("reason", "signal"))
        if spec.get("long") and rec["status"] != "ok":
            stopped[rec["config"]] = f"stopped after {rec['config']} N={fmt_n(rec['seq_len'])} {rec['status']}"
    result["updated"] = datetime.datetime.now().isoformat(timespec="seconds")
    atomic_json(path, result)
    ran = [r for r in result["runs"] if r.get("wall_s") is not None and r not in kept]
    over = [r["overhead_s"] for r in ran if r.get("overhead_s") is not None]
    by = {}
    for r in result["runs"]:
        by[r.get("status", "?")] = by.get(r.get("status", "?"), 0) + 1
    print(f"[bench] suite {suite} finished: {sum(r['wall_s'] for r in ran):.0f} s in {len(ran)} runs "
          f"({', '.join(f'{v} {k}' for k, v in by.items())})"
          + (f"; start-up + eval overhead {min(over):.0f}-{max(over):.0f} s per run" if over else ""),
          flush=True)
    return result


# ---------------------------------------------------------------------------------------------
# tables, targets, plots
# ---------------------------------------------------------------------------------------------

def _sorted_runs(res):
    cfg_order = {c: i for i, c in enumerate(res.get("settings", {}).get("configs", []))}
    return sorted(res["runs"], key=lambda r: (r["seq_len"], cfg_order.get(r["config"], 99), r["config"]))


SPARSE = ("hash", "qk")     # the kinds the 'best sparse' targets compare (not floor, dense)


def targets(res) -> list[dict]:
    """The goals this result can speak to (the speed-ups and lengths the project aims at):
    (what, value, goal, met)."""
    runs, suite, out = res["runs"], res["suite"], []

    def ok(cfg, n):
        for r in runs:
            if r["config"] == cfg and r["seq_len"] == n and r.get("status") == "ok" and r.get("tokens_per_s"):
                return r
        return None

    def add(what, value, goal):
        out.append({"target": what, "value": None if value is None else round(value, 3),
                    "goal": goal, "met": None if value is None else value >= goal})

    if suite == "speed1":
        h, f, c = ok("hash16", 16384), ok("dense-flash", 16384), ok("dense-cudnn", 16384)
        if h and f:
            add("1 GPU 16k hash16 / dense-flash tokens/s", h["tokens_per_s"] / f["tokens_per_s"], 2.4)
        if h and c:
            add("1 GPU 16k hash16 / dense-cudnn tokens/s", h["tokens_per_s"] / c["tokens_per_s"], 1.8)
        sparse16 = [r for r in runs if r["seq_len"] == 16384 and r.get("kind") == "hash"
                    and r.get("status") == "ok" and r.get("tokens_per_s")]
        if sparse16 and c:
            best = max(sparse16, key=lambda r: r["tokens_per_s"])
            add(f"1 GPU 16k best hash ({best['config']}) / dense-cudnn tokens/s",
                best["tokens_per_s"] / c["tokens_per_s"], 1.8)
        c64 = ok("dense-cudnn", 65536)
        if c64:
            sparse = [r for r in runs if r["seq_len"] == 65536 and r.get("kind") in SPARSE
                      and r.get("status") == "ok" and r.get("tokens_per_s")]
            if sparse:
                best = max(sparse, key=lambda r: r["tokens_per_s"])
                add(f"1 GPU 64k best sparse ({best['config']}) / dense-cudnn tokens/s",
                    best["tokens_per_s"] / c64["tokens_per_s"], 5.0)
    elif suite == "quality1":
        for r in runs:
            ref = _quality_ref(runs, r)
            if ref and r is not ref and r.get("status") == "ok" and r.get("final_eval_loss"):
                rel = r["final_eval_loss"] / ref["final_eval_loss"] - 1
                out.append({"target": f"{r['config']} eval loss vs {ref['config']} at {r['steps']} "
                                      f"steps, N={fmt_n(r['seq_len'])}",
                            "value": round(rel, 4), "goal": "<= +0.02", "met": rel <= 0.02})
    elif suite == "speed4":
        n = 131072
        dense = [r for r in (ok("dsu-cudnn", n), ok("dsu-flash", n)) if r]
        sparse = [r for r in runs if r["seq_len"] == n and r.get("kind") in SPARSE
                  and r.get("status") == "ok" and r.get("tokens_per_s")]
        if dense and sparse:
            d = max(dense, key=lambda r: r["tokens_per_s"])
            best = max(sparse, key=lambda r: r["tokens_per_s"])
            add(f"4 GPUs 128k best sparse SP ({best['config']}) / fastest DS-Ulysses ({d['config']})",
                best["tokens_per_s"] / d["tokens_per_s"], 5.0)
    elif suite == "longest1":
        for r in runs:
            ratio = floor_ratio(r, runs) if r.get("kind") == "hash" else None
            if ratio is not None:
                out.append({"target": f"{r['config']} step / attention-free step at "
                                      f"N={fmt_n(r['seq_len'])}",
                            "value": round(ratio, 3), "goal": "<= 1.5", "met": ratio <= 1.5})
        okr = [r for r in runs if r.get("status") == "ok" and r.get("kind") == "hash"]
        if okr:
            best = max(okr, key=lambda r: r["seq_len"])
            out.append({"target": "longest sequence trained on 1 GPU (aim 4M)",
                        "value": best["seq_len"], "goal": 2 ** 22, "met": best["seq_len"] >= 2 ** 22})
    elif suite == "longest4":
        okr = [r for r in runs if r.get("status") == "ok"]
        if okr:
            best = max(okr, key=lambda r: r["seq_len"])
            out.append({"target": f"longest sequence trained on {res['settings'].get('world')} GPUs (aim 1M-4M)",
                        "value": best["seq_len"], "goal": 2 ** 20, "met": best["seq_len"] >= 2 ** 20})
    return out


def table(res) -> str:
    suite, runs = res["suite"], _sorted_runs(res)
    s = res.get("settings", {})
    meta = res.get("meta", {})
    dev = (next((r.get("device") for r in runs if r.get("device")), None)
           or ", ".join(meta.get("gpus", [])) or ("cpu" if s.get("cpu") else "?"))
    lines = [f"### {suite}: {dev}, world {s.get('world')}, {s.get('steps')} steps per run "
             f"(median step time excludes the first {s.get('warmup_steps_excluded')}), commit "
             f"{meta.get('commit') or '?'}, torch {meta.get('torch')}, triton {meta.get('triton')}, "
             f"deepspeed {meta.get('deepspeed')}", ""]
    if s.get("extra_sets"):
        lines += [f"extra --set: {' '.join(s['extra_sets'])}", ""]
    bases = baselines_of(runs)
    if suite in ("speed1", "speed4"):
        hdr = ["N", "config", "status", "step ms", "tokens/s"] + (["tok/s/GPU"] if s.get("world", 1) > 1 else []) \
            + [f"× {b}" for b in bases] + ["peak GiB/GPU", "wall s", "note"]
        lines += ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
        for r in runs:
            sp = speedups(r, runs)
            ok = r.get("status") == "ok"
            row = [fmt_n(r["seq_len"]), r["config"], r.get("status", "?"),
                   fmt(r.get("median_step_ms")) if ok else "-", fmt_rate(r.get("tokens_per_s")) if ok else "-"]
            if s.get("world", 1) > 1:
                row.append(fmt_rate(r.get("tokens_per_s_per_gpu")) if ok else "-")
            row += [("**1.00**" if b == r["config"] and ok else fmt(sp.get(b), ".2f")) for b in bases]
            row += [fmt(r.get("peak_mem_gib_per_gpu"), ".2f"), fmt(r.get("wall_s"), ".0f"), _note(r, s)]
            lines.append("| " + " | ".join(row) + " |")
    elif suite == "quality1":
        refs = [_quality_ref(runs, r) for r in runs]     # a dense run of the same N and steps
        names = sorted({x["config"] for x in refs if x}) or ["dense"]
        hdr = ["N", "config", "status", "steps", "final train loss", "final eval loss",
               f"Δ eval vs {'/'.join(names)} (same N, steps)", "retrieval acc", "step ms",
               "tokens/s", "note"]
        lines += ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
        for r, ref in zip(runs, refs):
            ok = r.get("status") == "ok"
            rel = (r["final_eval_loss"] / ref["final_eval_loss"] - 1) if (ok and ref and r.get("final_eval_loss")) else None
            row = [fmt_n(r["seq_len"]), r["config"], r.get("status", "?"), str(r["steps"]),
                   fmt(r.get("final_train_loss"), ".4f"), fmt(r.get("final_eval_loss"), ".4f"),
                   fmt(None if rel is None else 100 * rel, "+.2f") + ("%" if rel is not None else ""),
                   fmt(r.get("retrieval_accuracy"), ".3f"), fmt(r.get("median_step_ms")),
                   fmt_rate(r.get("tokens_per_s")), _note(r, s)]
            lines.append("| " + " | ".join(row) + " |")
        rs = next((r for r in runs if r.get("status") == "ok"), None)
        if rs:
            tps = rs.get("tokens_per_step") or rs["seq_len"]
            lines += ["", f"{rs['steps']} optimizer steps of {tps // rs['seq_len']} x {fmt_n(rs['seq_len'])} "
                          f"tokens = {rs['steps'] * tps / 1e6:.2f}M tokens per config; retrieval_mix "
                          f"{_set_value(rs, 'train.retrieval_mix')}, eval every "
                          f"{_set_value(rs, 'train.eval_interval')} steps."]
    else:
        hdr = ["N", "config", "n_buckets", "status", "step ms", "× floor", "tokens/s", "tok/s/GPU",
               "peak GiB/GPU", "wall s", "note"]
        lines += ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
        for r in runs:
            ok = r.get("status") == "ok"
            row = [fmt_n(r["seq_len"]), r["config"], str(r.get("n_buckets", "-")), r.get("status", "?"),
                   fmt(r.get("median_step_ms")) if ok else "-", fmt(floor_ratio(r, runs), ".2f"),
                   fmt_rate(r.get("tokens_per_s")) if ok else "-",
                   fmt_rate(r.get("tokens_per_s_per_gpu")) if ok else "-",
                   fmt(r.get("peak_mem_gib_per_gpu"), ".2f"), fmt(r.get("wall_s"), ".0f"), _note(r, s)]
            lines.append("| " + " | ".join(row) + " |")
        okr = [r for r in runs if r.get("status") == "ok" and r.get("kind") != "floor"]
        if okr:
            b = max(okr, key=lambda r: r["seq_len"])
            lines += ["", f"Longest that trained: N = {b['seq_len']:,} ({fmt_n(b['seq_len'])}) tokens, "
                          f"{b.get('n_buckets')} buckets, {fmt(b.get('median_step_ms'))} ms/step, "
                          f"peak {fmt(b.get('peak_mem_gib_per_gpu'), '.2f')} GiB/GPU."]
    tg = targets(res)
    if tg:
        lines += ["", "Targets:"]
        for t in tg:
            met = {True: "met", False: "NOT met", None: "n/a"}[t["met"]]
            lines.append(f"- {t['target']}: {t['value']} (goal {t['goal']}): {met}")
    return "\n".join(lines) + "\n"


def floor_ratio(r, runs):
    """Step time over the attention-free floor's (config ``floor``, with the same offload
    setting) at the same length, or None."""
    if r.get("status") != "ok" or not r.get("median_step_ms"):
        return None
    for f in runs:
        if f.get("kind") == "floor" and f["seq_len"] == r["seq_len"] \
                and bool(f.get("offload")) == bool(r.get("offload")) \
                and f.get("status") == "ok" and f.get("median_step_ms") and same_overrides(f, r):
            return r["median_step_ms"] / f["median_step_ms"]
    return None


def _note(r, settings=None) -> str:
    parts = [r.get("note") or ""]
    if settings is not None and "extra_sets" in r \
            and r["extra_sets"] != settings.get("extra_sets", []):
        parts.append("extra --set: " + (" ".join(r["extra_sets"]) or "none"))
    if r.get("status") != "ok":
        parts.append((r.get("reason") or "")[:160])
    return "; ".join(p for p in parts if p).replace("|", "/").replace("\n", " ")


def _set_value(rec, key):
    m = re.search(r"--set " + re.escape(key) + r"=(\S+)", rec.get("cmd", ""))
    return m.group(1) if m else "?"


def plot(res, png: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[bench] matplotlib not installed: no PNG (rerun --plot-only where it is)", flush=True)
        return False
    suite, runs = res["suite"], _sorted_runs(res)
    if not runs:
        return False
    title = f"{suite} ({next((r.get('device') for r in runs if r.get('device')), 'device ?')}, world {res['settings'].get('world')})"
    colors = {"dense": "0.55", "hash": "tab:blue", "qk": "tab:orange", None: "tab:gray"}
    if suite in ("speed1", "speed4"):
        lens = sorted({r["seq_len"] for r in runs})
        fig, axes = plt.subplots(1, len(lens), figsize=(max(5, 4.2 * len(lens)), 4.2), squeeze=False)
        bases = baselines_of(runs)
        for ax, n in zip(axes[0], lens):
            rs = [r for r in runs if r["seq_len"] == n]
            vals = [(r.get("tokens_per_s") or 0) / 1e3 for r in rs]
            ax.bar(range(len(rs)), vals, color=[colors.get(r.get("kind"), "tab:gray") for r in rs])
            top = max(vals + [1e-9])
            for i, r in enumerate(rs):
                if r.get("status") != "ok":
                    ax.text(i, top * 0.02, r.get("status", "?"), rotation=90, ha="center", va="bottom",
                            fontsize=8, color="tab:red")
                    continue
                sp = speedups(r, runs)
                txt = "\n".join(f"{sp[b]:.2f}×{'c' if 'cudnn' in b else 'f' if 'flash' in b else b}"
                                for b in bases if b in sp)
                if txt:
                    ax.text(i, vals[i], txt, ha="center", va="bottom", fontsize=7)
            ax.set_xticks(range(len(rs)))
            ax.set_xticklabels([r["config"] for r in rs], rotation=45, ha="right", fontsize=8)
            ax.set_ylim(0, top * 1.3)
            ax.set_title(f"N = {fmt_n(n)}")
            ax.set_ylabel("tokens/s (thousands)")
            ax.grid(axis="y", alpha=0.3)
        fig.suptitle(title + ": tokens/s, ×c / ×f = speedup vs SDPA cuDNN / flash", fontsize=9)
    elif suite == "quality1":
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for r in runs:
            lab = r["config"] + (f" (ret {r['retrieval_accuracy']:.2f})" if r.get("retrieval_accuracy") is not None else "")
            c = colors.get(r.get("kind"))
            if r.get("curve_train"):
                st, lo = zip(*r["curve_train"])
                axes[0].plot(st, lo, color=c, label=lab, alpha=0.85)
            if r.get("curve_eval"):
                st, lo = zip(*r["curve_eval"])
                axes[1].plot(st, lo, "o-", color=c, label=lab)
        for ax, name in zip(axes, ("train loss (incl. retrieval mix)", "eval loss (validation text)")):
            ax.set_xlabel("step")
            ax.set_ylabel("nats / token")
            ax.set_title(name, fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(title + f", N = {', '.join(fmt_n(n) for n in sorted({r['seq_len'] for r in runs}))}", fontsize=9)
    else:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
        okr = [r for r in runs if r.get("status") == "ok"]
        bad = [r for r in runs if r.get("status") not in ("ok", "skipped")]
        for ax, key, lab in ((axes[0], "peak_mem_gib_per_gpu", "peak memory (GiB / GPU)"),
                             (axes[1], "median_step_ms", "step time (ms)")):
            have = [r for r in okr if r.get(key) is not None]
            for cfg in dict.fromkeys(r["config"] for r in have):
                rs = [r for r in have if r["config"] == cfg]
                ax.plot([r["seq_len"] for r in rs], [r[key] for r in rs], "o-", label=cfg)
                for r in rs:
                    ax.annotate(f"{r[key]:.1f}\nnb {r.get('n_buckets')}", (r["seq_len"], r[key]),
                                fontsize=7, textcoords="offset points", xytext=(0, 6), ha="center")
            top = max([r[key] for r in have] + [1.0])
            for r in bad:
                ax.plot([r["seq_len"]], [top], "x", color="tab:red", ms=10)
                ax.annotate(r["status"], (r["seq_len"], top), fontsize=8, color="tab:red",
                            textcoords="offset points", xytext=(0, -14), ha="center")
            ax.set_xscale("log", base=2)
            ns = sorted({r["seq_len"] for r in runs})
            ax.set_xticks(ns)
            ax.set_xticklabels([fmt_n(n) for n in ns])
            ax.minorticks_off()
            ax.set_xlabel("sequence length N (tokens, over all GPUs)")
            ax.set_ylabel(lab)
            ax.grid(alpha=0.3)
            ax.set_ylim(0, top * 1.25)
            if have:
                ax.legend(fontsize=8)
            else:
                ax.text(0.5, 0.5, "no data (CPU runs report no GPU memory)", transform=ax.transAxes,
                        ha="center", fontsize=8)
        fig.suptitle(title + ": activation checkpointing, n_buckets = N / bucket size", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return True


def report(res, out: str, quiet=False):
    md = table(res)
    with open(os.path.join(out, f"train_{res['suite']}.md"), "w") as f:
        f.write(md)
    res["targets"] = targets(res)
    atomic_json(result_path(out, res["suite"]), res)
    png = os.path.join(out, f"train_{res['suite']}.png")
    made = plot(res, png)
    if not quiet:
        print("\n" + md + (f"\n(plot: {png})" if made else ""), flush=True)


def plot_only(directory: str) -> int:
    paths = sorted(glob.glob(os.path.join(directory, "train_*.json")))
    if not paths:
        print(f"[bench] no train_*.json in {directory}", file=sys.stderr)
        return 1
    for p in paths:
        with open(p) as f:
            res = json.load(f)
        report(res, directory)
    return 0


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="speed1", help=f"comma list of {', '.join(ALL)}, or all")
    p.add_argument("--out", default=os.path.join(REPO, "out", "bench_train"), help="output directory")
    p.add_argument("--plot-only", metavar="DIR", help="rebuild tables and PNGs from DIR/train_*.json")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="passed to the entry point; cpu maps SDPA flash/cudnn to auto")
    p.add_argument("--configs", action="append", default=[], metavar="[SUITE=]LIST",
                   help="comma list of config names (replaces the suite's list)")
    p.add_argument("--seqlens", action="append", default=[], metavar="[SUITE=]LIST",
                   help="comma list of sequence lengths (16384, 16k, 1M)")
    p.add_argument("--steps", action="append", default=[], metavar="[SUITE=]N",
                   help="optimizer steps per run (defaults: speed 10, quality1 200, longest4 4)")
    p.add_argument("--budget-s", action="append", default=[], metavar="[SUITE=]S",
                   help="stop starting runs after S seconds (unscoped: whole invocation; "
                        "scoped: from the suite's start); 0 = no limit")
    p.add_argument("--run-timeout", action="append", default=[], metavar="[SUITE=]S",
                   help="wall-clock limit of one run (defaults: speed1 180, quality1 420, "
                        "speed4 240, longest4 360); clipped to the budget left")
    p.add_argument("--min-run-s", type=float, default=45.0,
                   help="do not start a run with less budget left than this")
    p.add_argument("--extra-set", action="append", default=[], metavar="[SUITE:]SEC.FIELD=V",
                   help="extra --set for the entry point, applied last (e.g. model.n_layer=2)")
    p.add_argument("--config", default=None, help="override the suite's TOML preset")
    p.add_argument("--nproc", type=int, default=4, help="processes (GPUs) of the 4-GPU suites")
    p.add_argument("--launcher", choices=["torchrun", "deepspeed"], default="torchrun")
    p.add_argument("--order", choices=["core-first", "grid"], default="core-first",
                   help="core-first: the target comparisons (dense baselines, hash16/32 or "
                        "hash64) at every length before the other configs")
    p.add_argument("--max-buckets", type=int, default=0,
                   help="cap on n_buckets of hash-b<size> configs (0 = none)")
    p.add_argument("--eval-every", type=int, default=25, help="quality1: eval interval")
    p.add_argument("--log-every", type=int, default=5, help="quality1: train-loss log interval")
    p.add_argument("--retrieval-mix", type=float, default=0.2, help="quality1: train.retrieval_mix")
    p.add_argument("--retrieval-samples", type=int, default=32, help="quality1: retrieval-eval sequences")
    p.add_argument("--resume", action="store_true",
                   help="keep the ok runs of OUT/train_<suite>.json (same config, N, steps), run the rest")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--validate", action="store_true",
                   help="with --dry-run: run the entry point's --dry-run on every command")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot_only:
        return plot_only(args.plot_only)
    suites = ALL if args.suite == "all" else [s.strip() for s in args.suite.split(",") if s.strip()]
    bad = [s for s in suites if s not in SUITES]
    if bad:
        print(f"[bench] unknown suite(s) {bad}; choose from {ALL} or all", file=sys.stderr)
        return 2
    args.out = os.path.abspath(args.out)
    os.makedirs(args.out, exist_ok=True)
    cpu = args.device == "cpu" or (args.device == "auto" and cuda_count() == 0)
    if cpu and args.device == "auto":
        args.device = "cpu"
    if args.dry_run:
        rc = 0
        for s in suites:
            for job in plan(s, args, cpu):
                print(shlex.join(job["cmd"]))
                if args.validate:
                    cmd = job["cmd"]
                    cmd = [sys.executable, "-m", "dist_sparse_attn.train"] + cmd[cmd.index("--config"):] + ["--dry-run"]
                    env = dict(job["env"], WORLD_SIZE=str(job["world"]), RANK="0")
                    pr = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
                    print("   " + ("ok" if pr.returncode == 0 else "FAIL: " + pr.stderr.strip()[-300:]))
                    rc |= pr.returncode != 0
        return int(rc)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    t_start = time.time()
    results = []
    try:
        for s in suites:
            results.append(run_suite(s, args, cpu, t_start))
    except Interrupted as e:
        print(f"[bench] interrupted ({e}): partial results written", flush=True)
        for s in suites:
            if os.path.exists(result_path(args.out, s)) and not any(r["suite"] == s for r in results):
                with open(result_path(args.out, s)) as f:
                    results.append(json.load(f))
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for res in results:
            report(res, args.out, quiet=True)
        return 130
    for res in results:
        report(res, args.out)
    print(f"[bench] done in {time.time() - t_start:.0f} s; results in {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
