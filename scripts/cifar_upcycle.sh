#!/bin/bash
# Issue 10's CIFAR experiment: does AFF add accuracy on top of a trained plain network?
# The published add_resnet20.cifar10_e12 is upcycled into aff_resnet20 and iaff_resnet20 (`--init-from`: every
# plain tensor copied, every fusion starting as the addition it replaces) and trained on, next to the add model
# itself continued with the same recipe, for SEEDS. Resumable: rerun the script (finished runs are skipped,
# unfinished ones continue from their last epoch checkpoint). PARALLEL runs at once, one thread each.
#   DATA=../shared/data/cifar10-train-jpeg.tar.gz OUT=/work/runs/upcycle EPOCHS=1 SUBSET=15000 scripts/cifar_upcycle.sh
# SUBSET=N trains on a fixed random N of the 45,000 training images (the same N for every run; 0 = all of them):
# the budget knob on a loaded CPU, where one full epoch of all six runs did not fit the time there was.
# Recipe: lr 0.02 (a fifth of the parent's peak 0.1; the parent ended its cosine at ~0), short warmup, cosine to 0
# so every run ends annealed like its parent; the parent's batch, weight decay, augmentation and split
# (the full 45,000 training images; validation = the last 500 images per class, as the parent had).
set -e
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/cifar10-train-jpeg.tar.gz}
OUT=${OUT:-runs/upcycle}
EPOCHS=${EPOCHS:-1}
SUBSET=${SUBSET:-0}
LR=${LR:-0.02}
SEEDS=${SEEDS:-"0 1"}
PARALLEL=${PARALLEL:-3}
PARENT=${PARENT:-add_resnet20.cifar10_e12}
PY=${PY:-python}
mkdir -p "$OUT"
run() {  # fusion seed
  local f=$1 s=$2 out=$OUT/${1}_resnet20-up-e$EPOCHS-n$SUBSET-s$2
  [ -f "$out/metrics.json" ] && return 0
  echo "=== $(date -u +%T) start ${f}_resnet20 seed $s -> $out"
  OMP_NUM_THREADS=1 $PY scripts/train.py --model ${f}_resnet20 --init-from "$PARENT" --data "$DATA" \
    --output "$out" --resume --epochs "$EPOCHS" --lr "$LR" --warmup-epochs 0.1 --min-lr 0 --batch-size 128 \
    --weight-decay 5e-4 --train-subset "$SUBSET" --seed "$s" > "$out.log" 2>&1
  echo "=== $(date -u +%T) done ${f}_resnet20 seed $s"
}
$PY -c "import sys; from aff_zoo.data import load_images; load_images(sys.argv[1])" "$DATA"  # decode once
for s in $SEEDS; do for f in iaff aff add; do  # slowest first (PARALLEL=6 runs all six at once)
  while [ "$(jobs -rp | wc -l)" -ge "$PARALLEL" ]; do wait -n || true; done
  run $f $s &
done; done
wait
$PY scripts/upcycle_table.py "$OUT"/*_resnet20-up-e$EPOCHS-n$SUBSET-s*
