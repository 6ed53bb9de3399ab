#!/usr/bin/env bash
# GPU session record: session 4, call 4 (1x H100): the 16k step with and without the
# counting sort, under Python's automatic GC, gc.freeze() after step 1 (train.gc_freeze,
# now the default) and manual GC every 100 steps (train.gc_interval); gc ms per step from
# gc.callbacks in summary.json.
# Result: GC takes 0.02-0.03 ms per step and neither knob helps (noise 62-78 ms for the
# same config); both knobs were removed after this call (the GC clock stays in the summary),
# so this script runs only at commit 'train: GC control ...'.
export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site wheels/*.whl > /dev/null 2>&1
R=/tmp/r8c; mkdir -p $R
bt() { local name=$1; shift
  CUDA_VISIBLE_DEVICES=0 timeout 60 python3 benchmarks/bench_train.py --out $R/$name --min-run-s 20 --suite speed1 --seqlens 16k --steps 40 --budget-s 55 "$@" > $R/$name.txt 2>&1
  for s in $R/$name/speed1/*/summary.json; do python3 -c "import json,sys;d=json.load(open('$s'));print('$name', d['attention'], 'median %.1f mean %.1f gc/step %.2f ms' % (d['median_step_ms'], d['mean_step_ms'], d['gc_ms_per_step']))"; done; }
for cs in 1 0; do
  export DSA_COUNTING_SORT=$cs
  bt auto_cs$cs --configs hash16 --extra-set train.gc_freeze=false
  bt freeze_cs$cs --configs hash16
  bt manual_cs$cs --configs hash16,hash16-loc4 --extra-set train.gc_interval=100
done
export DSA_COUNTING_SORT=1
bt dense_freeze --configs dense-cudnn,dense-flash
bt dense_auto --configs dense-cudnn --extra-set train.gc_freeze=false
cd $R && tar czf $OUT/run8c.tgz --exclude='*.pt' --exclude=checkpoints .
