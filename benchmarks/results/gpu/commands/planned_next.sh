#!/usr/bin/env bash
# PLANNED for the next GPU session (not yet run): two 4-GPU calls, ~8-9 min each.
#   bash benchmarks/results/gpu/commands/planned_next.sh 1    # call 1
#   bash benchmarks/results/gpu/commands/planned_next.sh 2    # call 2
# Call 1: the same-machine A/B of the counting sort on a quiet host, then the NCCL check of
# the current bucket routing (all cases, chunks 1 and 2), then bench_parallel at P=4.
# Call 2: bench_parallel at P=1 and P=2 (256k included), the 4-GPU 64k training row,
# and 4M tokens with the memory profile.
export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site wheels/*.whl > /dev/null 2>&1
R=/tmp/rn; mkdir -p $R
bt() { local g=$1 t=$2 name=$3; shift 3
  CUDA_VISIBLE_DEVICES=$g timeout $t python3 benchmarks/bench_train.py --out $R/$name --min-run-s 20 "$@" > $R/$name.txt 2>&1
  echo "$name rc=$?"; grep -E "^\| [0-9]" $R/$name.txt; }
SEQ="65536 131072 262144"
if [ "${1:-1}" = 1 ]; then
  DSA_COUNTING_SORT=0 bt 0 70 ab_torchsort --suite speed1 --seqlens 16k --configs hash16,dense-cudnn --budget-s 65
  bt 0 70 ab_countsort --suite speed1 --seqlens 16k --configs hash16,hash16-loc4 --budget-s 65
  timeout 240 torchrun --standalone --nproc_per_node 4 benchmarks/check_parallel_gpu.py --out $R/chk > $R/check_P4.txt 2>&1; echo "check rc=$?"; grep -E "^#.*runs|FAIL" $R/check_P4.txt
  timeout 60 torchrun --standalone --nproc_per_node 2 benchmarks/check_parallel_gpu.py --no-high-precision --out $R/chkp2 > $R/check_P2.txt 2>&1; echo "check P=2 rc=$?"; grep -E "^#.*runs|FAIL" $R/check_P2.txt
  DSA_BUCKET_CHUNKS=2 timeout 60 torchrun --standalone --nproc_per_node 4 benchmarks/check_parallel_gpu.py --strategies bucket --out $R/chk2 > $R/check_P4_c2.txt 2>&1; echo "check c2 rc=$?"; grep -E "^#.*runs|FAIL" $R/check_P4_c2.txt
  timeout 100 torchrun --standalone --nproc_per_node 4 benchmarks/bench_parallel.py --out $R/par --seqlens $SEQ --iters 5 --warmup 2 > $R/par_P4.txt 2>&1; echo "bench P=4 rc=$?"
else
  for P in 1 2; do timeout 150 torchrun --standalone --nproc_per_node $P benchmarks/bench_parallel.py --out $R/par --seqlens $SEQ --iters 5 --warmup 2 > $R/par_P$P.txt 2>&1; echo "bench P=$P rc=$?"; done
  bt 0,1,2,3 150 s4 --suite speed4 --seqlens 64k --configs dsu-cudnn,hash64,ulysses-hash64,hash64-loc4 --budget-s 140
  # 2M with the memory table first (it fits: 42 GiB), then 4M if the budget allows
  bt 0,1,2,3 200 l4 --suite longest4 --seqlens 2M,4M --extra-set train.profile=true --budget-s 190
fi
cd $R && tar czf $OUT/run.tgz --exclude='*.pt' --exclude=checkpoints .
