#!/usr/bin/env bash
# GPU session record: session 3, call 3 (4x H100).
# A (four one-GPU jobs): speed1 at 16k / 8k / 64k, eager vs model.compile=model, with
#   block-local heads; quality1 at 16k, 600 steps; bench_parallel at P=1 (256k row).
# B (four GPUs): speed4 at 128k and 64k; longest4 at 2M and 4M tokens.
export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site wheels/*.whl > /dev/null 2>&1
R=/tmp/r7; mkdir -p $R
bt() { local g=$1 t=$2 name=$3; shift 3
  CUDA_VISIBLE_DEVICES=$g timeout $t python3 benchmarks/bench_train.py --out $R/$name "$@" > $R/$name.txt 2>&1; echo "$name rc=$?"; }
M="--extra-set model.compile=model"
# ---- A
( bt 0 130 e16 --suite speed1 --seqlens 16k --configs hash16,hash16-loc4,dense-cudnn,dense-flash --budget-s 120
  bt 0 140 m16 --suite speed1 --seqlens 16k --configs hash16-loc4,dense-cudnn,hash16 $M --budget-s 130 ) &
( bt 1 100 m8 --suite speed1 --seqlens 8k --configs hash16-loc4,dense-cudnn,hash16 $M --budget-s 90
  bt 1 140 m64 --suite speed1 --seqlens 64k --configs hash64-loc4,dense-cudnn,hash16-loc4 $M --budget-s 130 ) &
bt 2 260 q16 --suite quality1 --configs dense-cudnn,hash16-loc4,hash16 --steps 600 --budget-s 250 &
( CUDA_VISIBLE_DEVICES=3 timeout 250 torchrun --standalone --nproc_per_node 1 benchmarks/bench_parallel.py --out $R/par --seqlens 65536 131072 262144 --iters 5 --warmup 2 > $R/par_P1.txt 2>&1; echo "bench P=1 rc=$?" ) &
wait
# ---- B
bt 0,1,2,3 150 s4 --suite speed4 --seqlens 128k --configs dsu-cudnn,hash64,ulysses-hash64,hash64-loc4 --budget-s 140
bt 0,1,2,3 120 l4 --suite longest4 --seqlens 2M,4M --budget-s 110
grep -E "^ *1 " $R/par_P1.txt
for d in e16 m16 m8 m64 q16 s4 l4; do grep -E "^\| [0-9]|goal" $R/$d.txt; done
cd $R && tar czf $OUT/run7.tgz --exclude='*.pt' --exclude=checkpoints .
