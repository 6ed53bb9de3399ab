#!/usr/bin/env bash
# GPU session record: 4-GPU session C: after the RoPE/hashing changes
export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH TORCH_CUDA_ARCH_LIST=9.0
python3 -m pip install -q --no-index --no-deps --target /tmp/site wheels/*.whl > /dev/null 2>&1
R=/tmp/r4; mkdir -p $R
COMMON="--set train.save_checkpoint=false --set train.eval_interval=0 --set train.retrieval_samples=0 --set train.log_interval=5"
t1() { local g=$1 name=$2 n=$3; shift 3
  CUDA_VISIBLE_DEVICES=$g timeout 150 python3 -m dist_sparse_attn.train --config configs/gpt2_small_16k.toml --set train.seq_len=$n --set train.steps=14 $COMMON "$@" --out $R/$name > $R/$name.log 2>&1
  echo "$name rc=$? $(grep 'done' $R/$name.log | sed 's/.*done: //')"; }
t4() { local name=$1; shift
  timeout 170 torchrun --standalone --nproc_per_node 4 launch/train.py --config configs/gpt2_small_128k_sp4.toml --set train.steps=8 $COMMON "$@" --out $R/$name > $R/$name.log 2>&1
  echo "$name rc=$? $(grep 'done' $R/$name.log | sed 's/.*done: //')"; }
( t1 0 g1_16384_hash16 16384; t1 0 g1_16384_dense_cudnn 16384 --set model.attention=dense --set model.sdpa_backend=cudnn; t1 0 g1_16384_dense_flash 16384 --set model.attention=dense --set model.sdpa_backend=flash ) > $R/gpu0.txt 2>&1 &
( t1 1 g1_65536_hash64 65536 --set model.n_buckets=64; t1 1 g1_65536_dense_cudnn 65536 --set model.attention=dense --set model.sdpa_backend=cudnn ) > $R/gpu1.txt 2>&1 &
( t1 2 g1_16384_hash16_prof 16384 --set train.profile=true; t1 2 g1_65536_hash16 65536 ) > $R/gpu2.txt 2>&1 &
( CUDA_VISIBLE_DEVICES=3 timeout 120 python3 -m pytest tests/test_triton_gpu.py tests/test_hashing.py -q -x -k "hash or lsh" > $R/pytest_hash.txt 2>&1; t1 3 g1_8192_hash16 8192; t1 3 g1_8192_dense_cudnn 8192 --set model.attention=dense --set model.sdpa_backend=cudnn ) > $R/gpu3.txt 2>&1 &
wait; cat $R/gpu*.txt; tail -2 $R/pytest_hash.txt
t4 sp4_128k_hash64_bucket
t4 sp4_128k_hash64_ulysses --set train.sp_strategy=ulysses
t4 sp4_128k_dense_dsu_cudnn --set model.attention=dense --set train.sp_strategy=ds-ulysses --set model.sdpa_backend=cudnn
timeout 200 torchrun --standalone --nproc_per_node 4 launch/train.py --config configs/gpt2_small_128k_sp4.toml --set train.seq_len=1048576 --set model.n_buckets=2048 --set model.activation_checkpointing=true --set train.steps=4 --set train.warmup_steps_excluded=1 $COMMON --out $R/sp4_1M_hash2048_ckpt > $R/sp4_1M.log 2>&1; echo "1M rc=$? $(grep 'done\|Error' $R/sp4_1M.log | tail -2)"
cd $R && tar czf $OUT/run4.tgz .
