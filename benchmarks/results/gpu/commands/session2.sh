#!/usr/bin/env bash
# GPU session record: 4-GPU session A: NCCL correctness + strong scaling
export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH TORCH_CUDA_ARCH_LIST=9.0
python3 -m pip install -q --no-index --no-deps --target /tmp/site wheels/*.whl > $OUT/pip.txt 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv > $OUT/card.txt; nvidia-smi topo -m >> $OUT/card.txt
R=/tmp/r; mkdir -p $R/chk $R/par
for P in 2 4; do
  timeout 170 torchrun --standalone --nproc_per_node $P benchmarks/check_parallel_gpu.py --out $R/chk > $R/check_P$P.txt 2>&1; echo "check P=$P rc=$?"
  grep -v "^\[rank\|Warning\|warn" $R/check_P$P.txt | tail -30
done
for P in 1 2 4; do
  timeout 110 torchrun --standalone --nproc_per_node $P benchmarks/bench_parallel.py --out $R/par --seqlens 65536 131072 --iters 5 --warmup 2 > $R/par_P$P.txt 2>&1; echo "bench P=$P rc=$?"
  tail -25 $R/par_P$P.txt
done
python3 benchmarks/bench_parallel.py --plot-only $R/par > $R/par_merged.txt 2>&1; tail -30 $R/par_merged.txt
cp $OUT/card.txt $R/; tar czf $OUT/run2.tgz -C $R .
