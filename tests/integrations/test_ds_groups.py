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


def _init(rank, world, port):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))


def _timeout_worker(rank, world, port, outdir):
    import torch
    import torch.distributed as dist
    from dist_sparse_attn.integrations import ds_groups
    _init(rank, world, port)
    read = getattr(ds_groups, "default_group_timeout", lambda: "(no default_group_timeout)")()
    _write(outdir, "reads_default_timeout", rank,
           "ok" if read == datetime.timedelta(seconds=PG_TIMEOUT_S) else f"read {read}")
    mpu = ds_groups.SequenceParallelMPU(2)      # timeout: inherited from the default group
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


def _arguments_worker(rank, world, port, outdir):
    """Bad arguments: the same ValueError on every rank, before any group is created."""
    import torch.distributed as dist
    from dist_sparse_attn.integrations import ds_groups
    _init(rank, world, port)
    errors = []
    for args, kw, name in (((0,), {}, "sequence_parallel_size"),
                           ((3,), {}, "sequence_parallel_size"),
                           (("2",), {}, "sequence_parallel_size"),
                           ((True,), {}, "sequence_parallel_size"),
                           ((2,), {"timeout": 5}, "timeout"),
                           ((2,), {"timeout": datetime.timedelta(0)}, "timeout")):
        try:
            ds_groups.SequenceParallelMPU(*args, **kw)
            errors.append(f"{args} {kw}: no error")
        except ValueError as e:
            if name not in str(e):
                errors.append(f"{args} {kw}: {e}")
        except Exception as e:      # noqa: BLE001 - reported as the case's failure
            errors.append(f"{args} {kw}: {type(e).__name__}: {e}")
    _write(outdir, "bad_arguments", rank, "ok" if not errors else "\n".join(errors))
    dist.barrier()      # rank 0 hosts the store: it must not leave before rank 1 is done with it
    os._exit(0)


TIMEOUT_CASES = ["reads_default_timeout", "inherited_timeout"]


@pytest.fixture(scope="module")
def timeout_results(tmp_path_factory):
    return run_workers(_timeout_worker, WORLD, tmp_path_factory.mktemp("mpu_timeout"),
                       TIMEOUT_CASES, timeout_s=90)


def _assert_ok(results, case):
    errors = [f"rank {r}: {results[case, r]}" for r in range(WORLD) if results[case, r] != "ok"]
    assert not errors, "\n".join(errors)


@pytest.mark.timeout(200)
@pytest.mark.parametrize("case", TIMEOUT_CASES)
def test_mpu_timeout(timeout_results, case):
    _assert_ok(timeout_results, case)


@pytest.mark.timeout(200)
def test_mpu_bad_arguments(tmp_path):
    _assert_ok(run_workers(_arguments_worker, WORLD, tmp_path, ["bad_arguments"], timeout_s=90),
               "bad_arguments")
