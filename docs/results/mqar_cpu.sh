#!/usr/bin/env bash
# MQAR where the window cannot reach: 16 key-value pairs open a 256-token sequence, each queried
# once at a uniformly drawn later position (power_a 1), vocabulary 64 (32 keys, 32 values: chance
# 1/32); the six block kinds of the S-NIAH experiment (window / segment 32). Two runs at a time,
# one thread each (2 cores). VOCAB=256 gives the harder task (chance 1/128; at chance for every
# kind at 500 steps of this size, see docs/results.md 1b).
# Usage: bash docs/results/mqar_cpu.sh [OUT_DIR]   (about 40 minutes)
set -euo pipefail
OUT=${1:-runs/mqar}
source "$(dirname "$0")/six_kinds.sh"
TASK=(--task mqar --task-set seq_len=256 --task-set num_kv_pairs=16 --task-set vocab=${VOCAB:-64} --task-set power_a=1.0)
TRAIN=(--steps "${STEPS:-1000}" --eval-every 100 --batch-size 16 --lr 3e-3)
run() { train_kind "$@"; }
six_kinds
for name in attention swa lmm mag mac mal; do
  printf '%s ' "$name"; grep '"eval"' "$OUT/$name/metrics.jsonl" | tail -1 | cut -c1-160
done
