"""``SequenceParallelMPU`` (:mod:`dist_sparse_attn.integrations.ds_groups`): its groups
take a collective timeout, by default the default group's own, so a rank that stalls
makes the others fail after that timeout instead of torch's 30-minute default for new
groups; bad arguments raise ValueError naming them.

One spawned 2-process gloo world (default-group timeout 3 s): rank 1 stops taking part
(sleeps 10 s) while rank 0 all-reduces over the mpu's sequence-parallel group; rank 0
must fail within 7 s.
"""
from __future__ import annotations

import datetime
import os
import time

import pytest

from helpers import run_workers

WORLD = 2
PG_TIMEOUT_S = 3
STALL_S = 10
BOUND_S = 7


def _write(outdir, name, rank, text):
    with open(os.path.join(outdir, f"{name}.{rank}"), "w") as f:
        f.write(text)


def _worker(rank, world, port, outdir):
    import torch
    import torch.distributed as dist
    from dist_sparse_attn.integrations.ds_groups import SequenceParallelMPU, default_group_timeout
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    # bad arguments: the same ValueError on every rank, before any group is created
    errors = []
    for args, kw, name in (((0,), {}, "sequence_parallel_size"), ((3,), {}, "sequence_parallel_size"),
                           (("2",), {}, "sequence_parallel_size"), ((True,), {}, "sequence_parallel_size"),
                           ((2,), {"timeout": 5}, "timeout"),
                           ((2,), {"timeout": datetime.timedelta(0)}, "timeout")):
        try:
            SequenceParallelMPU(*args, **kw)
            errors.append(f"{args} {kw}: no error")
        except ValueError as e:
            if name not in str(e):
                errors.append(f"{args} {kw}: {e}")
    _write(outdir, "bad_arguments", rank, "ok" if not errors else "\n".join(errors))
    ok = default_group_timeout() == datetime.timedelta(seconds=PG_TIMEOUT_S)
    _write(outdir, "reads_default_timeout", rank,
           "ok" if ok else f"default_group_timeout() = {default_group_timeout()}")

    mpu = SequenceParallelMPU(2)            # timeout: inherited from the default group
    if rank == 1:
        time.sleep(STALL_S)                 # stalls, then leaves without the collective
        _write(outdir, "inherited_timeout", rank, "ok")
        os._exit(0)
    t0 = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1), group=mpu.get_sequence_parallel_group())
        text = "the all_reduce completed without rank 1"
    except RuntimeError:
        dt = time.monotonic() - t0
        text = "ok" if dt < BOUND_S else f"failed only after {dt:.1f} s"
    _write(outdir, "inherited_timeout", rank, text)
    os._exit(0)


CASES = ["bad_arguments", "reads_default_timeout", "inherited_timeout"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_workers(_worker, WORLD, tmp_path_factory.mktemp("mpu"), CASES, timeout_s=120)


@pytest.mark.timeout(200)
@pytest.mark.parametrize("case", CASES)
def test_mpu(results, case):
    errors = [f"rank {r}: {results[case, r]}" for r in range(WORLD) if results[case, r] != "ok"]
    assert not errors, "\n".join(errors)
