#!/usr/bin/env bash
# PLANNED for the next GPU session (not yet run). The plan of the fourth session ran as
# session8*.sh; what is left:
#   bash benchmarks/results/gpu/commands/planned_next.sh      # one 4-GPU call, ~6 min
# 1. 2M with model.mlp_chunk (against the 37.6 GiB and 11.1 s/step measured without it),
# 2. 4M with model.mlp_chunk (longest4 now sets expandable segments itself),
# 3. the 4-GPU 64k row's local-heads config that the fourth session's budget cut.
export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site wheels/*.whl > /dev/null 2>&1
R=/tmp/rn; mkdir -p $R
bt() { local t=$1 name=$2; shift 2
  timeout $t python3 benchmarks/bench_train.py --out $R/$name --min-run-s 20 "$@" > $R/$name.txt 2>&1
  echo "$name rc=$?"; grep -E "^\| [0-9]" $R/$name.txt; }
bt 100 l2m_chunk --suite longest4 --seqlens 2M --extra-set model.mlp_chunk=65536 --budget-s 95
bt 180 l4m_chunk --suite longest4 --seqlens 4M --extra-set model.mlp_chunk=65536 --budget-s 175
bt 70 s4loc --suite speed4 --seqlens 64k --configs hash64-loc4 --budget-s 65
cd $R && tar czf $OUT/run.tgz --exclude='*.pt' --exclude=checkpoints .
