#!/usr/bin/env bash
# GPU-isolation drills with the NCCL backend: the GPU in slot 1 fails at step 3 of every job until
# quarantined; each drill runs two jobs under ResilientParallel (parallel_bench --fault).
#   DRILLS (default "ring=2 ulysses=2"), DEVICES (default 0,1), DRILL_TIMEOUT (default 90 s).
# A drill still running at its timeout has every thread's stack dumped (gdb if present, else
# /proc/<pid>/task/*/{comm,wchan,stack}) into $OUT/drill_<plan>.stacks before it is killed.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TORCH=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))')
NCCL_DIR=$TORCH/../nvidia/nccl/lib
mkdir -p /tmp/ditfleet-nccl && ln -sf "$NCCL_DIR/libnccl.so.2" /tmp/ditfleet-nccl/libnccl.so
export LD_LIBRARY_PATH=/tmp/ditfleet-nccl:$TORCH/lib:$NCCL_DIR
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# FAULT: 1:3 (device error) or 1:3:hang (the device stops answering; the step watchdog,
# DITFLEET_STEP_TIMEOUT_S, default 10 s here, aborts the groups and the health probe names it).
export DITFLEET_STEP_TIMEOUT_S=${DITFLEET_STEP_TIMEOUT_S:-10}
for plan in ${DRILLS:-ring=2 ulysses=2}; do
  name=drill_${plan//[=,]/_}${FAULT:+_${FAULT//:/_}}
  echo "== $name (t=${SECONDS}s)"
  .gpu/parallel_bench --size 1024 --steps 8 --devices "${DEVICES:-0,1}" --plans "$plan" --fault "${FAULT:-1:3}" \
    > "$OUT/$name.jsonl" 2> "$OUT/$name.log" &
  pid=$!
  for _ in $(seq 1 "${DRILL_TIMEOUT:-90}"); do kill -0 $pid 2>/dev/null || break; sleep 1; done
  if kill -0 $pid 2>/dev/null; then
    echo "   still running after ${DRILL_TIMEOUT:-90}s: dumping stacks"
    if command -v gdb >/dev/null; then
      timeout 60 gdb -p $pid -batch -ex "thread apply all bt 25" > "$OUT/$name.stacks" 2>&1
    else
      for t in /proc/$pid/task/*; do
        echo "--- $(cat $t/comm) $(cat $t/wchan 2>/dev/null)"; cat $t/stack 2>/dev/null
      done > "$OUT/$name.stacks"
    fi
    kill -9 $pid; wait $pid 2>/dev/null
    echo "   killed"
  else
    wait $pid; echo "   rc=$?"
  fi
  cat "$OUT/$name.jsonl"
  grep -E "quarantin|abort|WARN|ERROR|capture|watchdog|step timeout|hang" "$OUT/$name.log" | cut -c1-300 | head -12
done
