#!/usr/bin/env bash
# GPU session record: session 3, call 1 (4x H100): bench_train's first GPU run (speed1 and
# quality1 as four concurrent one-GPU jobs), then the NCCL equality check of the reworked
# bucket routing on 4 GPUs and a profiled P=4 bench_parallel step.
export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site wheels/*.whl > /dev/null 2>&1
R=/tmp/r5; mkdir -p $R; nvidia-smi --query-gpu=name,memory.total --format=csv > $R/card.txt
bt() { local g=$1 name=$2; shift 2
  CUDA_VISIBLE_DEVICES=$g timeout 300 python3 benchmarks/bench_train.py --out $R/$name "$@" > $R/$name.txt 2>&1; echo "$name rc=$?"; }
bt 0 s16k --suite speed1 --seqlens 16k --budget-s 280 &
bt 1 s8k --suite speed1 --seqlens 8k --budget-s 280 &
bt 2 s64k --suite speed1 --seqlens 64k --configs dense-cudnn,dense-flash,hash16,hash64 --budget-s 280 &
bt 3 q16k --suite quality1 --configs dense-cudnn,hash16,qk-drop50 --steps 400 --budget-s 280 &
wait
timeout 100 torchrun --standalone --nproc_per_node 4 benchmarks/check_parallel_gpu.py --out $R/chk > $R/check_P4.txt 2>&1; echo "check P=4 rc=$?"; tail -3 $R/check_P4.txt
timeout 130 torchrun --standalone --nproc_per_node 4 benchmarks/bench_parallel.py --out $R/par --seqlens 131072 262144 --iters 5 --warmup 2 --methods bucket ulysses --profile > $R/par_P4.txt 2>&1; echo "bench P=4 rc=$?"; tail -12 $R/par_P4.txt
for d in s16k s8k s64k q16k; do tail -16 $R/$d.txt; done
cd $R && tar czf $OUT/run5.tgz --exclude='*.pt' --exclude=checkpoints .
