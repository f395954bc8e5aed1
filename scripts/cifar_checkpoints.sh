#!/bin/bash
# The published CIFAR-10 checkpoints: AFF, iAFF and the same-budget addition baseline, one recipe.
# Sequential and resumable (rerun to continue). EPOCHS and ARCH set the budget; the docs/training.md table
# lists the budget that was actually run. PARALLEL=1 runs the three at once with one thread each (on a
# 2-core CPU small CIFAR nets use one core each better than two cores one after another).
#   DATA=../shared/data/cifar10-train-jpeg.tar.gz OUT=runs/checkpoints EPOCHS=2 ARCH=resnet8 scripts/cifar_checkpoints.sh
set -e
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/cifar10-train-jpeg.tar.gz}
OUT=${OUT:-runs/checkpoints}
EPOCHS=${EPOCHS:-200}
ARCH=${ARCH:-resnet20}
PY=${PY:-python}
PARALLEL=${PARALLEL:-0}
mkdir -p "$OUT"
run() {
  local f=$1 out=$OUT/${1}_${ARCH}-e$EPOCHS
  [ -f "$out/metrics.json" ] && return 0
  echo "=== $(date +%T) ${f}_${ARCH} $EPOCHS epochs"
  nice -n 10 $PY scripts/train.py --model ${f}_$ARCH --data "$DATA" --output "$out" --resume \
    --epochs $EPOCHS --warmup-epochs 0.3 --lr 0.1 --batch-size 128 --weight-decay 5e-4 --seed 0 --no-progress
}
if [ "$PARALLEL" = 1 ]; then
  $PY -c "import sys; from aff_zoo.data import load_images; load_images(sys.argv[1])" "$DATA"  # decode once
  pids=()
  for f in aff iaff add; do OMP_NUM_THREADS=1 run $f > "$OUT.${f}.log" 2>&1 & pids+=($!); done
  for p in "${pids[@]}"; do wait "$p"; done
else
  for f in aff iaff add; do run $f; done
fi
$PY scripts/ablation_table.py --kind checkpoints "$OUT"/*_$ARCH-e$EPOCHS
