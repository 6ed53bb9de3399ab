"""Command line of the sequence-parallel correctness check
(:mod:`dist_sparse_attn.testing.check_parallel`: cases, tolerances and report).

One process per GPU (``LOCAL_RANK``, NCCL); with ``--device cpu`` the same check runs
on gloo at small sizes (CI, ``tests/parallel/test_check_parallel.py``). Exit code 1 on
every rank when any case failed.

    torchrun --standalone --nproc_per_node 4 benchmarks/check_parallel_gpu.py --out DIR
    torchrun --standalone --nproc_per_node 4 benchmarks/check_parallel_gpu.py --out DIR \\
        --seqlen 32768 65536
    # CPU (gloo), small:
    torchrun --standalone --nproc_per_node 2 benchmarks/check_parallel_gpu.py --out DIR \\
        --device cpu --seqlen 2048 --heads 4 --dim 16 --dtype float32
"""
from __future__ import annotations

import os
import sys

import torch

from dist_sparse_attn.testing import check_parallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _dist import init_process_group  # noqa: E402  (benchmarks/_dist.py)


def main(argv=None) -> int:
    args = check_parallel.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device (use --device cpu)")
    device = init_process_group(args.device == "cuda", args.timeout, args.threads)
    return check_parallel.run(args, device)


if __name__ == "__main__":
    sys.exit(main())
