#!/usr/bin/env bash
# GPU session record: session 3, call 2 (4x H100).
# A: NCCL equality check at P=4 (all cases/strategies) while two one-GPU quality runs
#    (block-local heads) share GPUs 2-3 (their step times are not used).
# B: four one-GPU jobs: counting-sort GPU tests + micro-benchmark; speed1 with
#    model.compile=blocks vs eager at 16k, 64k, 8k.
# C: the overlapped bucket path (DSA_BUCKET_CHUNKS=2) through the check; bench_parallel P=4.
export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site wheels/*.whl > /dev/null 2>&1
R=/tmp/r6; mkdir -p $R
bt() { local g=$1 t=$2 name=$3; shift 3
  CUDA_VISIBLE_DEVICES=$g timeout $t python3 benchmarks/bench_train.py --out $R/$name "$@" > $R/$name.txt 2>&1; echo "$name rc=$?"; }
C="--extra-set model.compile=blocks"
# ---- A
bt 2 250 qA --suite quality1 --configs hash16-loc4,hash16-loc2 --steps 400 --budget-s 240 &
bt 3 250 qB --suite quality1 --configs dense-cudnn,hash16-loc6 --steps 400 --budget-s 240 &
timeout 230 torchrun --standalone --nproc_per_node 4 benchmarks/check_parallel_gpu.py --out $R/chk > $R/check_P4.txt 2>&1; echo "check P=4 rc=$?"
grep -E "^#.*runs|FAIL" $R/check_P4.txt | tail -4
wait
# ---- B
( CUDA_VISIBLE_DEVICES=0 timeout 120 python3 -m pytest tests/test_triton_sort.py -q -m gpu > $R/pytest_sort.txt 2>&1; tail -2 $R/pytest_sort.txt
  CUDA_VISIBLE_DEVICES=0 timeout 60 python3 benchmarks/bench_sort.py --profile > $R/bench_sort.txt 2>&1; cat $R/bench_sort.txt
  CUDA_VISIBLE_DEVICES=0 timeout 60 python3 -m pytest tests/test_triton_gpu.py -q -x -k "hash and not long" > $R/pytest_hash.txt 2>&1; tail -2 $R/pytest_hash.txt ) &
( bt 1 200 s16c --suite speed1 --seqlens 16k --configs dense-cudnn,hash16,hash16-loc4,dense-flash $C --budget-s 150
  bt 1 60 s16e --suite speed1 --seqlens 16k --configs hash16 --budget-s 40 ) &
bt 2 220 s64c --suite speed1 --seqlens 64k --configs dense-cudnn,hash64,hash64-loc4 $C --budget-s 200 &
bt 3 220 s8c --suite speed1 --seqlens 8k --configs dense-cudnn,hash16,hash16-loc4 $C --budget-s 200 &
wait
# ---- C
DSA_BUCKET_CHUNKS=2 timeout 70 torchrun --standalone --nproc_per_node 4 benchmarks/check_parallel_gpu.py --strategies bucket --out $R/chk2 > $R/check_P4_ovl2.txt 2>&1; echo "check ovl2 rc=$?"
grep -E "^#.*runs|FAIL" $R/check_P4_ovl2.txt | tail -3
timeout 90 torchrun --standalone --nproc_per_node 4 benchmarks/bench_parallel.py --out $R/par --seqlens 131072 262144 --iters 5 --warmup 2 --methods bucket bucket-ovl2 ulysses > $R/par_P4.txt 2>&1; echo "bench P=4 rc=$?"; grep -E "^ *4 " $R/par_P4.txt
for d in s16c s16e s64c s8c qA qB; do grep -E "^\| [0-9]|Targets|goal" $R/$d.txt; done
cd $R && tar czf $OUT/run6.tgz --exclude='*.pt' --exclude=checkpoints .
