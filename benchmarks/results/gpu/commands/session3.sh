#!/usr/bin/env bash
# GPU session record: 4-GPU session B: training on 4 GPUs, then the 1-GPU suite on each GPU
export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH TORCH_CUDA_ARCH_LIST=9.0
python3 -m pip install -q --no-index --no-deps --target /tmp/site wheels/*.whl > /dev/null 2>&1
R=/tmp/r3; mkdir -p $R
COMMON="--set train.save_checkpoint=false --set train.eval_interval=0 --set train.retrieval_samples=0 --set train.log_interval=5"
t4() { # name, extra args: 4-GPU run
  local name=$1; shift
  timeout 150 torchrun --standalone --nproc_per_node 4 launch/train.py --config configs/gpt2_small_128k_sp4.toml --set train.steps=8 $COMMON "$@" --out $R/$name > $R/$name.log 2>&1
  echo "$name rc=$? $(grep 'done' $R/$name.log | sed 's/.*done: //')"
}
t4 sp4_128k_hash64 --set train.profile=true
t4 sp4_128k_hash16 --set model.n_buckets=16
t4 sp4_128k_dense_dsu_cudnn --set model.attention=dense --set train.sp_strategy=ds-ulysses --set model.sdpa_backend=cudnn
t4 sp4_128k_dense_dsu_flash --set model.attention=dense --set train.sp_strategy=ds-ulysses --set model.sdpa_backend=flash
t1() { # gpu, name, seq, extra: 1-GPU run
  local g=$1 name=$2 n=$3; shift 3
  CUDA_VISIBLE_DEVICES=$g timeout 200 python3 -m dist_sparse_attn.train --config configs/gpt2_small_16k.toml --set train.seq_len=$n --set train.steps=14 $COMMON "$@" --out $R/$name > $R/$name.log 2>&1
  echo "$name rc=$? $(grep 'done' $R/$name.log | sed 's/.*done: //')"
}
q1() { # gpu, name, extra: quality run 8k, 300 steps, eval every 50, retrieval
  local g=$1 name=$2; shift 2
  CUDA_VISIBLE_DEVICES=$g timeout 200 python3 -m dist_sparse_attn.train --config configs/gpt2_small_16k.toml --set train.seq_len=8192 --set train.steps=300 --set train.warmup=30 --set train.eval_interval=50 --set train.eval_iters=8 --set train.retrieval_mix=0.2 --set train.retrieval_samples=64 --set train.retrieval_seq_len=8192 --set train.save_checkpoint=false --set train.log_interval=10 "$@" --out $R/$name > $R/$name.log 2>&1
  echo "$name rc=$? $(grep 'done' $R/$name.log | sed 's/.*done: //')"
}
( for n in 16384 8192; do t1 0 g1_${n}_dense_cudnn $n --set model.attention=dense --set model.sdpa_backend=cudnn; t1 0 g1_${n}_hash16 $n; done; t1 0 g1_16384_dense_flash 16384 --set model.attention=dense --set model.sdpa_backend=flash; t1 0 g1_65536_dense_cudnn 65536 --set model.attention=dense --set model.sdpa_backend=cudnn; t1 0 g1_65536_hash16 65536 --set train.profile=true; t1 0 g1_65536_hash64 65536 --set model.n_buckets=64 ) > $R/gpu0.txt 2>&1 &
( for n in 16384 8192; do t1 1 g1_${n}_hash8 $n --set model.n_buckets=8; t1 1 g1_${n}_hash32 $n --set model.n_buckets=32; t1 1 g1_${n}_qk70 $n --set model.attention=qk --set model.qk_keep_rate=0.7; t1 1 g1_${n}_qk50 $n --set model.attention=qk --set model.qk_keep_rate=0.5; t1 1 g1_${n}_qk30 $n --set model.attention=qk --set model.qk_keep_rate=0.3; done; t1 1 g1_16384_hash16_prof 16384 --set train.profile=true ) > $R/gpu1.txt 2>&1 &
( q1 2 q_dense_cudnn --set model.attention=dense --set model.sdpa_backend=cudnn; q1 2 q_qk50 --set model.attention=qk --set model.qk_keep_rate=0.5 ) > $R/gpu2.txt 2>&1 &
( q1 3 q_hash16; q1 3 q_hash8 --set model.n_buckets=8 ) > $R/gpu3.txt 2>&1 &
( sleep 1; CUDA_VISIBLE_DEVICES=2 timeout 150 python3 -m pytest tests/test_triton_gpu.py -q -k long -x > $R/pytest_long.txt 2>&1 ) &
wait
cat $R/gpu*.txt; tail -3 $R/pytest_long.txt
cd $R && tar czf $OUT/run3.tgz --exclude='*.pt' --exclude=checkpoints . 
