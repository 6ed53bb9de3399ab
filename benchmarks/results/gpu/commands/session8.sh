#!/usr/bin/env bash
# GPU session record: session 4 (4x H100), replacing planned_next.sh.
#   call 1: the NCCL check of the current bucket routing (all_to_all_many) at P=4 and P=2,
#           plus the 2-chunk path, all without the fp32 reference (routing errors are whole
#           wrong rows, far above the bf16 tolerance against the single-device run);
#           then bench_parallel at P=4, 2, 1 on the same machine (strong scaling, 256k).
#   call 2: the counting-sort A/B on a quiet host, the 4-GPU 64k training row, 2M/4M with
#           the memory table, and the fp32-referenced check of the uneven/qk/dense cases.
export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site wheels/*.whl > /dev/null 2>&1
R=/tmp/r8; mkdir -p $R
T0=$(date +%s); el() { echo "  [t=$(( $(date +%s) - T0 )) s]"; }
bt() { local g=$1 t=$2 name=$3; shift 3
  CUDA_VISIBLE_DEVICES=$g timeout $t python3 benchmarks/bench_train.py --out $R/$name --min-run-s 20 "$@" > $R/$name.txt 2>&1
  echo "$name rc=$?"; grep -E "^\| [0-9]|goal" $R/$name.txt; el; }
chk() { local P=$1 t=$2 name=$3; shift 3
  timeout $t torchrun --standalone --nproc_per_node $P benchmarks/check_parallel_gpu.py --out $R/$name "$@" > $R/$name.txt 2>&1
  echo "$name rc=$?"; grep -E "^#.*runs|FAIL|passed|failed" $R/$name.txt | tail -4; el; }
SEQ="65536 131072 262144"
if [ "${1:-1}" = 1 ]; then
  chk 4 130 chk_P4 --no-high-precision
  chk 2 90 chk_P2 --no-high-precision
  DSA_BUCKET_CHUNKS=2 chk 4 60 chk_P4_c2 --no-high-precision --strategies bucket
  for P in 4 2 1; do
    timeout 150 torchrun --standalone --nproc_per_node $P benchmarks/bench_parallel.py --out $R/par --seqlens $SEQ --iters 5 --warmup 2 > $R/par_P$P.txt 2>&1
    echo "bench P=$P rc=$?"; grep -E "^ *$P " $R/par_P$P.txt; el
  done
else
  DSA_COUNTING_SORT=0 bt 0 70 ab_torchsort --suite speed1 --seqlens 16k --configs hash16,dense-cudnn --budget-s 65
  bt 0 70 ab_countsort --suite speed1 --seqlens 16k --configs hash16,dense-cudnn --budget-s 65
  bt 0,1,2,3 150 s4 --suite speed4 --seqlens 64k --configs dsu-cudnn,hash64,ulysses-hash64,hash64-loc4 --budget-s 140
  bt 0,1,2,3 200 l4 --suite longest4 --seqlens 2M,4M --extra-set train.profile=true --budget-s 190
  chk 4 120 chk_P4_hp --cases hash16-uneven qk80 dense
fi
cd $R && tar czf $OUT/run8_$1.tgz --exclude='*.pt' --exclude=checkpoints .
