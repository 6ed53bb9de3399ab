#!/usr/bin/env bash
# GPU session record: session 4, call 5 (4x H100, the session's last device minutes):
# 4M tokens on 4 GPUs (8192 buckets, activation checkpointing); 2M if 4M fails early.
export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site wheels/*.whl > /dev/null 2>&1
R=/tmp/r8d; mkdir -p $R; T0=$(date +%s)
bt() { local t=$1 name=$2; shift 2
  timeout $t python3 benchmarks/bench_train.py --out $R/$name --min-run-s 20 --suite longest4 "$@" > $R/$name.txt 2>&1
  echo "$name rc=$?"; grep -E "^\| [0-9]" $R/$name.txt; }
bt 190 l4m --seqlens 4M --budget-s 185
left=$(( 200 - ($(date +%s) - T0) ))
if [ $left -gt 70 ]; then bt $left l2m --seqlens 2M --budget-s $(( left - 5 )); fi
grep -h "peak\|Error\|error" $R/*/longest4/*.log | grep -v "^ " | tail -5
cd $R && tar czf $OUT/run8d.tgz --exclude='*.pt' --exclude=checkpoints .
# call 6 (the same warm machine, the last ~150 s of device time): 4M again with the
# allocator's expandable segments and 2 steps (1 excluded), eval_iters 1, no retrieval eval:
#   PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python3 benchmarks/bench_train.py \
#     --out $R/l4m --suite longest4 --seqlens 4M --steps 2 --budget-s 125 --min-run-s 20 \
#     --extra-set train.warmup_steps_excluded=1 --extra-set train.eval_iters=1 \
#     --extra-set train.retrieval_samples=0
# step 1 trained (33.4 s), step 2 ran out of memory in an MLP recompute (c_fc, 6 GiB).
