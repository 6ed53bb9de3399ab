#!/usr/bin/env bash
# GPU session record: first GPU session
set -x
export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH TORCH_CUDA_ARCH_LIST=9.0
python3 -m pip install -q --no-index --no-deps --target /tmp/site wheels/*.whl > $OUT/pip.txt 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv > $OUT/card.txt
python3 -c "import torch, triton, deepspeed; print(torch.__version__, triton.__version__, deepspeed.__version__)" >> $OUT/card.txt 2>&1
python3 -c "import xdist, pytest_timeout" 2>/dev/null && X="-n 8 --timeout 900" || X=""
( time timeout 330 python3 -m pytest tests/test_triton_gpu.py tests/test_varlen.py tests/test_compile.py -q -x $X ) > $OUT/pytest_gpu.txt 2>&1
tail -5 $OUT/pytest_gpu.txt
( time timeout 120 python3 -m dist_sparse_attn.train --config configs/tiny.toml --out /tmp/tiny ) > $OUT/train_tiny.txt 2>&1
grep -v "^\[20" $OUT/train_tiny.txt | tail -8
for a in "hash" "dense --set model.sdpa_backend=cudnn" "dense --set model.sdpa_backend=flash"; do
  timeout 100 python3 -m dist_sparse_attn.train --config configs/gpt2_small_16k.toml --set train.steps=12 --set train.eval_interval=0 --set train.retrieval_samples=0 --set train.save_checkpoint=false --set train.log_interval=4 --set model.attention=$a --out /tmp/g16 > /tmp/g16.txt 2>&1
  echo "== $a"; grep "done\|Error\|error" /tmp/g16.txt | tail -3
done 2>&1 | tee $OUT/train16k.txt
