#!/usr/bin/env bash
# GPU session record: session 4, call 3 (1x H100): why the 16k step is slower with the
# counting sort (A/B of call 2: torch.sort 63.7 vs counting sort 74.8 ms/step).
export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site wheels/*.whl > /dev/null 2>&1
R=/tmp/r8b; mkdir -p $R
bt() { local g=$1 t=$2 name=$3; shift 3
  CUDA_VISIBLE_DEVICES=$g timeout $t python3 benchmarks/bench_train.py --out $R/$name --min-run-s 20 "$@" > $R/$name.txt 2>&1
  echo "$name rc=$?"; grep -E "^\| [0-9]" $R/$name.txt; }
timeout 90 python3 benchmarks/probes/sort_ab_probe.py > $R/probe.txt 2>&1; echo "probe rc=$?"; grep "counting_sort=" $R/probe.txt
timeout 40 python3 benchmarks/bench_sort.py --profile > $R/bench_sort.txt 2>&1; head -6 $R/bench_sort.txt | tail -3
bt 0 60 cs --suite speed1 --seqlens 16k --configs hash16 --steps 20 --budget-s 55 --extra-set train.profile=true
DSA_COUNTING_SORT=0 bt 0 60 ts --suite speed1 --seqlens 16k --configs hash16 --steps 20 --budget-s 55 --extra-set train.profile=true
cd $R && tar czf $OUT/run8b.tgz --exclude='*.pt' --exclude=checkpoints .
