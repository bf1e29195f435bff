# Helpers shared by the device-call scripts (bench/*/run*.sh): a wall-clock budget for the call
# and its stages. Source it after setting OUT (results folder, with logs/) and BUDGET_S (seconds
# the call may use); SECONDS counts from the script's start.
#   STAGE_EXT     file suffix of a stage's stdout under $OUT/logs (default json)
#   STAGE_MEM_MS  sample the GPU's used memory every so many ms into logs/mem_NAME.txt while a
#                 stage runs (default 0: off)
#   STAGE_TAIL    lines of stderr shown when a stage fails (default 4)
#   STAGE_MIN_S   a stage with less of the budget left is skipped (default 20)
#   STAGE_KILL_S  seconds between the timeout's TERM and its KILL (default 5)
#   STAGES        the stages `want` picks (space-separated; empty: all)

# Seconds of the budget left.
left() { echo $(( BUDGET_S - SECONDS )); }

# stage NAME TIMEOUT CMD...: runs CMD within TIMEOUT (cut to the budget left; skipped below
# STAGE_MIN_S),
# stdout to logs/NAME.$STAGE_EXT, stderr to logs/NAME.err. Always returns 0: one failed stage
# does not end the call.
stage() {
  local name=$1 t=$2; shift 2
  local l; l=$(left); (( t > l )) && t=$l
  if (( t < ${STAGE_MIN_S:-20} )); then echo "== $name: skipped, ${l}s left"; return 0; fi
  echo "== $name (timeout ${t}s, t=${SECONDS}s)"
  local smi=""
  if (( ${STAGE_MEM_MS:-0} > 0 )); then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms "$STAGE_MEM_MS" \
      > "$OUT/logs/mem_$name.txt" 2>/dev/null &
    smi=$!
  fi
  timeout -k "${STAGE_KILL_S:-5}" "$t" "$@" > "$OUT/logs/$name.${STAGE_EXT:-json}" 2> "$OUT/logs/$name.err"
  local rc=$?
  if [[ -n $smi ]]; then kill "$smi" 2>/dev/null; wait "$smi" 2>/dev/null; fi
  echo "== $name rc=$rc at t=${SECONDS}s"
  (( rc != 0 )) && tail -"${STAGE_TAIL:-4}" "$OUT/logs/$name.err"
  return 0
}

# want NAME: whether STAGES (empty: every stage) names NAME.
want() { [[ -z "${STAGES:-}" || " $STAGES " == *" $1 "* ]]; }
