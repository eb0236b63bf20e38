#!/usr/bin/env bash
# S-NIAH passkey on CPU: six block kinds of similar size trained on needles in 256-byte contexts,
# then tested at 256..4096 bytes x 5 depths. Two runs at a time, one thread each (2 cores).
# Usage: bash docs/results/niah_cpu.sh [OUT_DIR]   (about 50 minutes on 2 cores)
set -euo pipefail
OUT=${1:-runs/niah}
source "$(dirname "$0")/six_kinds.sh"
TASK=(--task niah --task-set context_len=256 --task-set digits=5)
STEPS=${STEPS:-1000}
TRAIN=(--steps "$STEPS" --eval-every $((STEPS / 10)) --batch-size 16 --lr 3e-3)
run() {  # train, then the needle grid
  train_kind "$@"
  OMP_NUM_THREADS=1 "$TN" niah "$OUT/$1" --lengths 256,512,1024,2048,4096 --depths 0,0.25,0.5,0.75,1 \
    --digits 5 --samples 20 > "$OUT/$1.niah.log" 2>&1
}
six_kinds
echo "done: $OUT"
