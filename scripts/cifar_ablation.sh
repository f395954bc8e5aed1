#!/bin/bash
# The same-recipe fusion ablation of docs/training.md: resnet8 (b=1) with every fusion, seed 0, plus seed 1 for
# add and aff. Runs one after another; rerun the script to resume (finished runs are skipped, an
# unfinished one continues from its last epoch checkpoint).
#   DATA=../shared/data/cifar10-train-jpeg.tar.gz OUT=runs/ablation scripts/cifar_ablation.sh
set -e
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/cifar10-train-jpeg.tar.gz}
OUT=${OUT:-runs/ablation}
PY=${PY:-python}
for run in add:0 aff:0 iaff:0 add:1 se:0 local:0 sk:0 aff:1; do
  f=${run%%:*}; s=${run##*:}
  out=$OUT/${f}_resnet8-s$s
  [ -f "$out/metrics.json" ] && continue
  echo "=== $(date +%T) ${f}_resnet8 seed $s"
  nice -n 10 $PY scripts/train.py --model ${f}_resnet8 --data "$DATA" --output "$out" --resume \
    --epochs 2 --train-subset 15000 --warmup-epochs 0.3 --lr 0.1 --batch-size 128 --weight-decay 5e-4 \
    --seed $s --no-progress
done
$PY scripts/ablation_table.py "$OUT"/*_resnet8-s*
