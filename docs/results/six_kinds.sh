# Shared by niah_cpu.sh, mqar_cpu.sh and lm_cpu.sh: the six block kinds at one size (dim 64, 2
# blocks, 2 heads; memory chunk 8 (the presets', theta_max 1/8 with the curvature cap) and 4 persistent tokens;
# window / segment 32), trained two at a time with one thread each (2 cores). The sourcing script
# defines `run NAME PRESET OVERRIDES...`; SEED (default 0) seeds both the model and the data.
TN=${TN:-.venv/bin/titans-nas}
SIZE=(--set dim=64 --set depth=2 --set heads=2)
MEM=(--set block.persistent.num_tokens=4)
SEED=${SEED:-0}
train_kind() {  # name, preset, overrides... (+ TASK and TRAIN of the sourcing script)
  local name=$1 preset=$2; shift 2
  OMP_NUM_THREADS=1 "$TN" train "$preset" "${SIZE[@]}" --set seed="$SEED" "$@" "${TASK[@]}" "${TRAIN[@]}" --seed "$SEED" \
    --out "$OUT/$name" > "$OUT/$name.log" 2>&1
}
pick() {  # run NAME ... unless KINDS (e.g. KINDS="lmm mac") leaves it out
  [[ -z "${KINDS:-}" || " $KINDS " == *" $1 "* ]] && run "$@" || true
}
six_kinds() {
  mkdir -p "$OUT"
  pick attention attention-tiny &
  pick swa swa-tiny --set block.window=32
  wait
  pick lmm lmm-tiny "${MEM[@]}" &
  pick mag mag-tiny --set block.window=32 "${MEM[@]}"
  wait
  pick mac mac-tiny --set block.segment_len=32 "${MEM[@]}" &
  pick mal mal-tiny --set block.window=32 "${MEM[@]}"
  wait
}
