#!/bin/bash
# The CIFAR-10 runs of docs/cifar10-weights.md as one queue: RUNS entries are recipe/model:seed, written to
# $OUT/<recipe>/<model>-s<seed>. WORKERS runs at once, THREADS threads each, nice 19; a run is claimed with flock,
# so a killed worker frees it. Rerun the same command to resume: finished runs (metrics.json) are skipped, an
# unfinished one continues from its last epoch checkpoint.
#   DATA=../shared/data/cifar10-train-jpeg.tar.gz OUT=runs WORKERS=1 THREADS=2 \
#     setsid nohup scripts/cifar_queue.sh >> runs/queue.log 2>&1 &
set -e
cd "$(dirname "$0")/.."
# With the kernel's autogroup scheduling, nice acts only inside a session: another session (CI, tests) would
# still share the cores 50/50 with the queue. Lower the whole session's weight too (run it under setsid, as above).
[ "$(cat /proc/sys/kernel/sched_autogroup_enabled 2>/dev/null)" = 1 ] && echo 19 > /proc/self/autogroup 2>/dev/null || true
DATA=${DATA:-../shared/data/cifar10-train-jpeg.tar.gz}
OUT=${OUT:-runs}
PY=${PY:-python}
WORKERS=${WORKERS:-2}
THREADS=${THREADS:-1}  # per run: 1 for the thin ResNet-20s, WORKERS=1 THREADS=2 finishes one ResNet-11 sooner
# torch.compile for these recipes only (measured on this CPU, docs/cifar10-weights.md: 1.13-1.2x for the fp32
# ResNet-20s, 0.8x for the bfloat16 ResNet-9s). It does not change a run's recipe; a resumed run may switch it.
COMPILE=${COMPILE:-cifar10-e12}
# More flags for every run, for what suits this machine but not the recipe's: on a CPU without AVX512-BF16 (a Cascade
# Lake Xeon), bfloat16 is emulated and 2.3x slower than float32, so there EXTRA="--amp-dtype auto --resume-override
# amp_dtype" trains in float32 (no autocast on a CPU) and records the change in the run's checkpoint and metrics.
EXTRA=${EXTRA:-}
# The thin-network ablation on CPU (ResNet-20, 12 epochs: seeds 0-2 of add/AFF/iAFF, then SE/SK/local; done),
# aff_resnet11 at 96 epochs (done, 92.22 %; its iAFF and add companions were dropped), then iaff_resnet11 seed 2 on
# the mixup recipe, the CPU road to a 93 % iAFF (docs/cifar10-weights.md): about 19 h with WORKERS=1 THREADS=2 on an
# AMD EPYC (450 s an epoch). A GPU lease (scripts/gpu_batch.py) trains such a run in minutes.
RUNS=${RUNS:-"cifar10-e12/add_resnet20:0 cifar10-e12/aff_resnet20:0 cifar10-e12/iaff_resnet20:0
  cifar10-e12/add_resnet20:1 cifar10-e12/aff_resnet20:1 cifar10-e12/iaff_resnet20:1
  cifar10-e12/add_resnet20:2 cifar10-e12/aff_resnet20:2 cifar10-e12/iaff_resnet20:2
  cifar10-e12/se_resnet20:0 cifar10-e12/sk_resnet20:0 cifar10-e12/local_resnet20:0
  cifar10-r11-e96/aff_resnet11:0 cifar10-r11-mix-e150/iaff_resnet11:2"}
$PY -c "import sys; from aff_zoo.data import load_images; load_images(sys.argv[1])" "$DATA"  # decode once
worker() {
  for run in $RUNS; do
    recipe=${run%%/*}; rest=${run#*/}; model=${rest%%:*}; seed=${rest##*:}; out=$OUT/$recipe/$model-s$seed
    [ -f "$out/metrics.json" ] && continue
    mkdir -p "$out"
    extra=--no-compile; [[ " $COMPILE " == *" $recipe "* ]] && extra=--compile
    # -n: a run another worker holds is skipped; the lock dies with its holder
    flock -n "$out/.lock" env OMP_NUM_THREADS=$THREADS nice -n 19 $PY -m aff_zoo.cli train --recipe "$recipe" \
      --model "$model" --seed "$seed" --data "$DATA" --output "$out" --resume --no-progress $extra $EXTRA \
      >> "$out/stdout.log" 2>&1 || echo "=== $(date +%T) $run: not run by this worker (held or failed; see $out/stdout.log)"
  done
}
pids=()
for w in $(seq "$WORKERS"); do worker & pids+=($!); sleep 5; done
for p in "${pids[@]}"; do wait "$p"; done
$PY scripts/ablation_table.py "$OUT"/cifar10-e12/*_resnet20-s*
