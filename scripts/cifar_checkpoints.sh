#!/bin/bash
# The published CIFAR-10 checkpoints: AFF, iAFF and the same-budget addition baseline, one recipe.
# Sequential and resumable (rerun to continue). EPOCHS and ARCH set the budget; the README table
# lists the budget that was actually run.
#   DATA=../shared/data/cifar10-train-jpeg.tar.gz OUT=runs/checkpoints EPOCHS=2 ARCH=resnet8 scripts/cifar_checkpoints.sh
set -e
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/cifar10-train-jpeg.tar.gz}
OUT=${OUT:-runs/checkpoints}
EPOCHS=${EPOCHS:-200}
ARCH=${ARCH:-resnet20}
PY=${PY:-python}
for f in aff iaff add; do
  out=$OUT/${f}_${ARCH}-e$EPOCHS
  [ -f "$out/metrics.json" ] && continue
  echo "=== $(date +%T) ${f}_${ARCH} $EPOCHS epochs"
  nice -n 10 $PY scripts/train.py --model ${f}_$ARCH --data "$DATA" --output "$out" --resume \
    --epochs $EPOCHS --warmup-epochs 0.3 --lr 0.1 --batch-size 128 --weight-decay 5e-4 --seed 0 --no-progress
done
$PY scripts/ablation_table.py --kind checkpoints "$OUT"/*_$ARCH-e$EPOCHS
