#!/usr/bin/env bash
# The GPU check of issue 11, run as is on a CUDA machine (under 8 minutes on one datacenter GPU):
#   1. installs aff_zoo from this checkout (pip install -e; dependencies already present are kept),
#   2. runs scripts/gpu_check.py: torch.hub.load(<checkout>, <tag>, source="local", pretrained=True,
#      device="cuda") against the CPU's logits; 50 AMP training steps of aff_resnet50 / resnet50d
#      (batch 128, 224 px) and aff_resnet20 / add_resnet20 (batch 512, 32 px) on synthetic GPU data;
#      fp16 channels_last inference throughput (batch 256) of the ImageNet models and their timm peers,
#   3. writes one markdown table of ratios to $OUT/gpu_check.md (and the raw figures to gpu_check.json).
#
# Usage: scripts/gpu_check.sh [--cpu] [--no-install] [--out DIR]
#   --cpu         tiny sizes, few steps, on the CPU (what CI runs; under a minute)
#   --no-install  use the checkout through PYTHONPATH instead of installing it
#   OUT=DIR or --out DIR: output folder (default ./gpu_check_out)
# Exit status: 0 all checks passed, 1 a check failed, 2 bad usage or no CUDA device without --cpu.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-./gpu_check_out}"
CPU=()
INSTALL=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cpu) CPU=(--cpu); shift ;;
    --no-install) INSTALL=0; shift ;;
    --out) OUT="$2"; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

PY="${PYTHON:-python}"
if [[ $INSTALL == 1 ]]; then
  echo "== installing aff_zoo from $HERE"
  "$PY" -m pip install --quiet --no-build-isolation -e "$HERE"
else
  export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"
fi
# The published CIFAR tags ship in the checkout's hub/ folder: no network needed.
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
"$PY" -c 'import torch, aff_zoo; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "aff_zoo", aff_zoo.__file__)'
mkdir -p "$OUT"
# 470 s: the whole check stays under 8 minutes with the install
timeout 470 "$PY" "$HERE/scripts/gpu_check.py" --out "$OUT" ${CPU[@]+"${CPU[@]}"}
