#!/usr/bin/env bash
# S-NIAH passkey on CPU: six block kinds of similar size trained on needles in 256-byte contexts,
# then tested at 256..4096 bytes x 5 depths. Two runs at a time, one thread each (2 cores).
# Usage: bash docs/results/niah_cpu.sh [OUT_DIR]   (about an hour on 2 cores)
set -euo pipefail
OUT=${1:-runs/niah}
TN=${TN:-.venv/bin/titans-nas}
SIZE=(--set dim=64 --set depth=2 --set heads=2)
TASK=(--task niah --task-set context_len=256 --task-set digits=5)
TRAIN=(--steps 1000 --eval-every 100 --batch-size 16 --lr 3e-3 --seed 0)
MEM=(--set block.memory.chunk_size=16 --set block.persistent.num_tokens=4)
run() {  # name, preset, extra overrides...
  local name=$1 preset=$2; shift 2
  OMP_NUM_THREADS=1 "$TN" train "$preset" "${SIZE[@]}" "$@" "${TASK[@]}" "${TRAIN[@]}" --out "$OUT/$name" > "$OUT/$name.log" 2>&1
  OMP_NUM_THREADS=1 "$TN" niah "$OUT/$name" --lengths 256,512,1024,2048,4096 --depths 0,0.25,0.5,0.75,1 \
    --digits 5 --samples 20 > "$OUT/$name.niah.log" 2>&1
}
mkdir -p "$OUT"
run attention attention-tiny &
run swa swa-tiny --set block.window=32
wait
run lmm lmm-tiny "${MEM[@]}" &
run mag mag-tiny --set block.window=32 "${MEM[@]}"
wait
run mac mac-tiny --set block.segment_len=32 "${MEM[@]}" &
run mal mal-tiny --set block.window=32 "${MEM[@]}"
wait
echo "done: $OUT"
