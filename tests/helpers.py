"""Seeds, devices, input builders and comparison helpers shared by the tests
(``tests/conftest.py`` puts this folder on ``sys.path``: ``from helpers import ...``)."""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import torch

from dist_sparse_attn.distributed import deepspeed_shm_names, remove_deepspeed_shm
from dist_sparse_attn.distributed import free_port  # noqa: F401 - the test files import it from here

# the repository root (this file lives in tests/)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# variables a launcher sets (and the Triton interpreter switch): an outer launcher's
# values must not leak into the jobs a test starts
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
               "ROLE_RANK", "MASTER_ADDR", "MASTER_PORT", "TRITON_INTERPRET")
LAUNCH_PREFIXES = ("TORCHELASTIC_", "OMPI_", "PMI_", "PMIX_", "MPI_", "HYDRA_")


def is_launch_var(name: str) -> bool:
    return name in LAUNCH_VARS or name.startswith(LAUNCH_PREFIXES)


def job_env(**extra) -> dict:
    """The environment of a job a test starts: this one without launcher variables, the
    repository first on PYTHONPATH, then ``extra``."""
    env = {k: v for k, v in os.environ.items() if not is_launch_var(k)}
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


def clear_launch_vars(monkeypatch):
    """Remove the launcher variables from this process (an in-process dry run must not
    see an outer launcher's world); the Triton interpreter switch stays."""
    for k in list(os.environ):
        if is_launch_var(k) and k != "TRITON_INTERPRET":
            monkeypatch.delenv(k, raising=False)
CUDA = torch.cuda.is_available()


def base_seed() -> int:
    """The seed every test starts from: 0 by default; ``DSA_TEST_SEED=<int>`` sets it, and
    ``DSA_TEST_SEED=random`` draws one, which is then put into the environment so that
    every later call, worker process and subprocess sees the same value."""
    value = os.environ.get("DSA_TEST_SEED", "").strip()
    if value.lower() == "random":
        value = str(int.from_bytes(os.urandom(4), "little"))
        os.environ["DSA_TEST_SEED"] = value
    if not value:
        return 0
    if not value.isdigit():
        raise ValueError(f"DSA_TEST_SEED must be a non-negative integer or 'random', "
                         f"got {value!r}")
    return int(value)


def triton_runs_on(device: str) -> bool:
    """Whether the Triton kernels run on tensors of ``device``: always on "cuda" (when there
    is a GPU); on "cpu" only under the interpreter, which conftest.py turns on for
    machines without CUDA."""
    if device == "cuda":
        return CUDA
    return os.environ.get("TRITON_INTERPRET") == "1" and not CUDA


SM90_COMPILE = r"""
import os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                         "cuobjdump")
if not os.path.exists(CUOBJDUMP):
    sys.exit(77)


def compile_sm90(fn, sig, cons, attrs=None, **options):
    # compile a @triton.jit function for sm_90 -> (stack bytes, ptxas resource line)
    src = ASTSource(fn, sig, {(fn.arg_names.index(n),): v for n, v in cons.items()},
                    attrs or {})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name],
                           capture_output=True, text=True, check=True).stdout
    os.unlink(f.name)
    return int(re.search(r"STACK:(\d+)", usage).group(1)), usage.strip().splitlines()[-1]
"""


def run_sm90_check(script: str, tmp_path) -> None:
    """Run ``script`` (after :data:`SM90_COMPILE`, which defines ``compile_sm90``) in a
    process without the Triton interpreter, so that it compiles kernels for sm_90 with
    Triton's bundled ptxas (no GPU needed); skips the test where this Triton has no
    cuobjdump (exit 77) and fails with the script's output otherwise."""
    import subprocess
    import sys

    import pytest
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", SM90_COMPILE + script], env=env,
                       capture_output=True, text=True, timeout=280)
    if r.returncode == 77:
        pytest.skip("this Triton cannot compile for sm_90 here (no cuobjdump or no "
                    "TensorDescriptor)")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def rand_qkv(B, Nq, Nk, H, Hkv, D, dtype=torch.float32, device="cpu", requires_grad=False):
    """Random q (B, Nq, H, D), k and v (B, Nk, Hkv, D) from randn (never zeros).

    Drawn in float32 and rounded to ``dtype``, so every dtype sees the same
    distribution.
    """
    def one(n, heads):
        x = torch.randn(B, n, heads, D, device=device).to(dtype)
        return x.requires_grad_(requires_grad)
    return one(Nq, H), one(Nk, Hkv), one(Nk, Hkv)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (absolute norm when expected is 0)."""
    a, e = actual.double(), expected.double()
    diff = torch.linalg.vector_norm(a - e).item()
    ref = torch.linalg.vector_norm(e).item()
    return diff / ref if ref > 0 else diff


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float, name: str,
                     *, max_rtol: Optional[float] = None, atol: float = 0.0):
    """Assert ``||a - e|| <= rtol * ||e|| + atol`` and ``max|a - e| <= max_rtol * max|e| + atol``.

    ``max_rtol`` defaults to ``10 * rtol``: the worst element of a tensor is
    allowed to be off by more than the norm-wise average, but relative to the
    tensor's scale. Infinite entries of ``expected`` must be matched exactly;
    ``actual`` must be finite wherever ``expected`` is. ``atol`` covers
    tensors that are zero in exact arithmetic (e.g. dq when every row has a
    single key), where any relative criterion is meaningless.
    """
    assert actual.shape == expected.shape, \
        f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    a, e = actual.detach().double(), expected.detach().double()
    e_fin = torch.isfinite(e)
    bad = e_fin & ~torch.isfinite(a)
    assert not bad.any(), (f"{name}: {int(bad.sum())} non-finite values where the "
                           f"expected values are finite (first at {bad.nonzero()[0].tolist()})")
    if not e_fin.all():
        same = (a == e) | e_fin
        assert same.all(), (f"{name}: {int((~same).sum())} entries differ where the expected "
                            f"value is infinite (first at {(~same).nonzero()[0].tolist()})")
        a, e = a[e_fin], e[e_fin]
    if e.numel() == 0:
        return
    diff = (a - e).abs()
    ref = torch.linalg.vector_norm(e).item()
    err = torch.linalg.vector_norm(a - e).item()
    assert err <= rtol * ref + atol, (
        f"{name}: ||a-e|| = {err:.3e}, ||e|| = {ref:.3e}, relative error "
        f"{err / ref if ref > 0 else float('inf'):.3e} > rtol {rtol:.1e} (+ atol {atol:.1e}); "
        f"max abs diff {diff.max().item():.3e}")
    max_rtol = 10 * rtol if max_rtol is None else max_rtol
    scale = e.abs().max().item()
    worst = diff.max().item()
    assert worst <= max_rtol * scale + atol, (
        f"{name}: max abs diff {worst:.3e} at {diff.argmax().item()} (flattened) "
        f"> {max_rtol:.1e} * max|e| ({scale:.3e}) + atol {atol:.1e}")


def grads(fn: Callable, inputs: Sequence[torch.Tensor], do, *, return_out: bool = False):
    """Gradients of ``fn(*inputs)`` with respect to ``inputs`` for upstream gradient ``do``.

    ``fn`` may return one tensor or a tuple (e.g. ``(o, lse)``); ``do`` is
    then one tensor or a tuple of the same length, where ``None`` means no
    upstream gradient for that output. The inputs are detached copies, so the
    caller's tensors are untouched. Returns the tuple of gradients, or
    ``(outputs, gradients)`` when ``return_out``.
    """
    xs = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*xs)
    outs = out if isinstance(out, tuple) else (out,)
    dos = do if isinstance(do, tuple) else (do,)
    assert len(outs) == len(dos), f"{len(outs)} outputs but {len(dos)} upstream gradients"
    pairs = [(o, d.to(o.dtype)) for o, d in zip(outs, dos) if d is not None]
    g = torch.autograd.grad([o for o, _ in pairs], xs, [d for _, d in pairs],
                            allow_unused=True)
    g = tuple(torch.zeros_like(x) if gi is None else gi for x, gi in zip(xs, g))
    if not return_out:
        return g
    det = tuple(o.detach() for o in outs)
    return (det if isinstance(out, tuple) else det[0]), g


# ---------------------------------------------------------------------------------------------
# multi-process tests
# ---------------------------------------------------------------------------------------------



def run_workers(target, world, outdir, names, timeout_s, extra_args=()):
    """Spawn ``world`` processes ``target(rank, world, port, *extra_args, outdir)``
    on a fresh port, wait at most ``timeout_s`` for all of them, kill the ones still
    running, and collect the file ``outdir/<name>.<rank>`` each rank writes per case
    ("ok" or an error text). Returns {(name, rank): text}; a missing file becomes a
    message saying whether that rank hung or with which exit code it died."""
    import datetime

    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, *extra_args, str(outdir)),
                         daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
    for p in procs:
        p.join(max(1.0, (deadline - datetime.datetime.now()).total_seconds()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
        procs[r].join(10)
    # what DeepSpeed's CPU all-reduce left (workers that start DeepSpeed themselves, or
    # were killed, leave 66 MB per rank)
    remove_deepspeed_shm(deepspeed_shm_names("127.0.0.1", port, range(world)))
    results = {}
    for name in names:
        for r in range(world):
            path = os.path.join(str(outdir), f"{name}.{r}")
            if os.path.exists(path):
                with open(path) as f:
                    results[name, r] = f.read()
            else:
                results[name, r] = (f"no result: rank {r} " + (
                    f"still running after {timeout_s} s (killed)" if r in hung
                    else f"exited with code {procs[r].exitcode}"))
    return results


def world_runs(worker, worlds, timeout_s, tmp_path_factory, label):
    """The module fixture of the multi-process test files: ``get(world)`` runs the cases
    ``worlds[world]`` once per world size in ``world`` spawned processes
    (``run_workers(worker, ..., extra_args=(names, seed))``) and caches the results; the
    seed is :func:`base_seed`, printed for replay."""
    cache = {}
    seed = base_seed()

    def get(world):
        if world not in cache:
            cache[world] = run_workers(worker, world, tmp_path_factory.mktemp(f"world{world}"),
                                       worlds[world], timeout_s,
                                       extra_args=(worlds[world], seed))
        return cache[world]
    print(f"{label} test seed: {seed} (replay with DSA_TEST_SEED={seed})")
    return get


def world_cases(worlds):
    """``pytest.mark.parametrize("world,case", **world_cases(worlds))`` keywords for
    {world: [case, ...]}: every (world, case) pair, the case names as ids."""
    return dict(argvalues=[(w, c) for w, cs in worlds.items() for c in cs],
                ids=[c for cs in worlds.values() for c in cs])


def assert_ranks_ok(results, world, case):
    """Every rank of ``run_workers`` results reported "ok" for ``case``."""
    errors = [f"rank {r}:\n{results[case, r]}" for r in range(world)
              if results[case, r] != "ok"]
    assert not errors, "\n".join(errors)


def record_cases(cases, check, rank, outdir) -> bool:
    """Worker side of :func:`run_workers`: run ``check(i, name)`` for every case name,
    write "ok" or the traceback to ``outdir/<name>.<rank>``, then barrier and destroy
    the default process group. Raises SystemExit(1) if a case failed on this rank."""
    import traceback

    import torch.distributed as dist
    failed = False
    try:
        for i, name in enumerate(cases):
            try:
                check(i, name)
                msg = "ok"
            except Exception:   # noqa: BLE001 - reported through the result file
                msg, failed = traceback.format_exc(), True
            with open(os.path.join(outdir, f"{name}.{rank}"), "w") as f:
                f.write(msg)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if failed:
        raise SystemExit(1)


# ---------------------------------------------------------------------------------------------
# sequence-parallel cases (tests/parallel/test_sequence_parallel.py, test_bucket_overlap.py)
# ---------------------------------------------------------------------------------------------

def sp_buckets(kind, nb, q, k, gen):
    """Buckets (B, N, H) and (B, N, Hkv) of a sequence-parallel test case, by kind."""
    from dist_sparse_attn import lsh_buckets
    B, N, H, _ = q.shape
    Hkv = k.shape[2]
    if kind == "lsh":
        return lsh_buckets(q, nb, seed=3, group_size=H // Hkv), lsh_buckets(k, nb, seed=3)
    if kind == "all_dropped":
        return -torch.ones(B, N, H, dtype=torch.long), -torch.ones(B, N, Hkv, dtype=torch.long)
    if kind == "keep":         # QK-sparse: half of the (token, head) items dropped
        return (torch.where(torch.rand(B, N, H, generator=gen) < 0.5, -1, 0),
                torch.where(torch.rand(B, N, Hkv, generator=gen) < 0.5, -1, 0))
    if kind == "no_keys":      # queries kept, every key dropped: every row empty
        return torch.zeros(B, N, H, dtype=torch.long), -torch.ones(B, N, Hkv, dtype=torch.long)
    if kind == "single":       # one group per (b, kv head): most ranks own nothing
        return torch.zeros(B, N, H, dtype=torch.long), torch.zeros(B, N, Hkv, dtype=torch.long)
    if kind == "sparse_ids":    # ids far apart: too many for a dense (b, j, bucket) table
        ids = torch.tensor([-1, 0, 10 ** 6, 2 ** 30, 2 ** 31 - 2])           # and dropped
        return (ids[torch.randint(0, 5, (B, N, H), generator=gen)],
                ids[torch.randint(0, 5, (B, N, Hkv), generator=gen)])
    out = []
    for heads in (H, Hkv):
        b = torch.randint(0, nb, (B, N, heads), generator=gen)
        if kind == "skewed":    # ~85% of the tokens in bucket 0
            b = torch.where(torch.rand(B, N, heads, generator=gen) < 0.85, 0, b)
        if kind == "half":      # half the tokens, with all their heads, in bucket 0
            b = torch.where(torch.rand(B, N, 1, generator=gen) < 0.5, 0, b)
        if kind == "dropped":   # ~30% dropped, with several negative ids
            drop = torch.rand(B, N, heads, generator=gen) < 0.3
            b = torch.where(drop, -torch.randint(1, 4, (B, N, heads), generator=gen), b)
        out.append(b)
    return tuple(out)


def sp_case(spec, D, gen):
    """The global inputs of a sequence-parallel case and the float64 oracle.

    spec: lengths, B, H, Hkv, buckets (a kind of :func:`sp_buckets`), optional nb,
    causal, include_self, dtype, drop_rank (that rank's tokens all dropped).
    Returns a dict: q, k, v, g (output gradient), qb, kb, kw (causal/include_self),
    o_ref, ref_grads.
    """
    from dist_sparse_attn import reference_attention
    lengths = spec["lengths"]
    B, H, Hkv, N = spec["B"], spec["H"], spec["Hkv"], sum(lengths)
    dtype = spec.get("dtype", torch.float64)
    q = torch.randn(B, N, H, D, generator=gen, dtype=dtype)
    k = torch.randn(B, N, Hkv, D, generator=gen, dtype=dtype)
    v = torch.randn(B, N, Hkv, D, generator=gen, dtype=dtype)
    g = torch.randn(B, N, H, D, generator=gen, dtype=dtype)
    qb, kb = sp_buckets(spec["buckets"], spec.get("nb"), q, k, gen)
    if "drop_rank" in spec:     # one rank keeps nothing: no queries, no keys to send
        a = sum(lengths[:spec["drop_rank"]])
        qb[:, a:a + lengths[spec["drop_rank"]]] = -1
        kb[:, a:a + lengths[spec["drop_rank"]]] = -1
    kw = dict(causal=spec.get("causal", True), include_self=spec.get("include_self", True))
    full = [x.clone().requires_grad_(True) for x in (q, k, v)]
    o_ref = reference_attention(*full, qb, kb, **kw)
    ref_grads = torch.autograd.grad(o_ref, full, g)
    return dict(q=q, k=k, v=v, g=g, qb=qb, kb=kb, kw=kw, o_ref=o_ref.detach(),
                ref_grads=ref_grads)


def sp_check_shard(case, o, grads, lo, hi):
    """This rank's output and q/k/v gradients against the oracle's rows [lo, hi)."""
    q = case["q"]
    grads = [torch.zeros_like(x[:, lo:hi]) if gr is None else gr
             for x, gr in zip((case["q"], case["k"], case["v"]), grads)]
    assert o.shape == (q.shape[0], hi - lo) + tuple(q.shape[2:]) and o.dtype == q.dtype
    # the oracle computes in float64: float32 results are held to ~1e-5 relative
    tol = dict(rtol=1e-9, atol=1e-12) if q.dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    assert_close_rel(o, case["o_ref"][:, lo:hi], name="o", **tol)
    for nm, gr, ref in zip(("dq", "dk", "dv"), grads, case["ref_grads"]):
        assert_close_rel(gr, ref[:, lo:hi], name=nm, **tol)


def assert_dropped_values_unread(dev, backend):
    """NaN and inf in the q, k, v (and upstream gradient) of dropped tokens (padding
    garbage, say): every kept output and every gradient equals the run with zeros there.
    Dropped keys share key tiles with kept ones, where a 0 weight times NaN would be NaN."""
    from dist_sparse_attn import qk_sparse_attention
    B, N, H, D = 1, 150, 2, 16
    q, k, v = rand_qkv(B, N, N, H, H, D, device=dev)
    keep = torch.rand(B, N, H, device=dev) < 0.5
    keep[:, 0] = True
    bad = (~keep)[..., None]
    outs = []
    for fill in (0.0, float("nan"), float("inf")):
        xs = [torch.where(bad, torch.full_like(x, fill), x).detach().requires_grad_()
              for x in (q, k, v)]
        o, lse = qk_sparse_attention(*xs, keep, keep, backend=backend, return_lse=True)
        g = torch.where(bad, torch.full_like(o, fill), torch.ones_like(o))
        gl = torch.where(keep, 0.5, fill).transpose(1, 2)                  # (B, H, N)
        torch.autograd.backward((o, lse), (g, gl))
        outs.append((o.detach(), *[torch.where(bad, 0.0, x.grad) for x in xs]))
    for got in outs[1:]:
        for name, a, b in zip(("o", "dq", "dk", "dv"), got, outs[0]):
            assert torch.isfinite(a).all(), name
            assert torch.equal(a, b), name
