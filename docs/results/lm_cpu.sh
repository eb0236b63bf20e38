#!/usr/bin/env bash
# Byte-level Shakespeare (bits per byte on held-out plays) for the six block kinds of the S-NIAH
# experiment, same sizes, one fixed budget: 400 steps of 16 x 256 bytes. Two runs at a time, one
# thread each (2 cores). Usage: bash docs/results/lm_cpu.sh [OUT_DIR]   (about 20 minutes)
set -euo pipefail
OUT=${1:-runs/lm}
source "$(dirname "$0")/six_kinds.sh"
TASK=(--task lm --task-set seq_len=256)
TRAIN=(--steps 400 --eval-every 100 --batch-size 16 --lr 3e-3)
run() { train_kind "$@"; }
six_kinds
for name in attention swa lmm mag mac mal; do
  printf '%s ' "$name"; grep '"eval"' "$OUT/$name/metrics.jsonl" | tail -1
done
