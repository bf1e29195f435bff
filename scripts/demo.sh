#!/usr/bin/env bash
# The ditfleet demo: starts a scheduler and one worker, submits a job with
# `ditfleetctl submit --wait`, prints where the image is and how long each stage took, then
# drains both services with SIGTERM. With FLUX_MODEL_DIR set the worker serves that Flux.1
# checkpoint; without it, a tiny random-weight Flux-architecture config (clearly labelled: the
# image is noise, the pipeline is real).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bin=${DITFLEET_BIN_DIR:-target/debug}
run=.run/demo
mkdir -p "$run"
export DITFLEET_NAMESPACE=${DITFLEET_NAMESPACE:-ditfleet-demo}
export DITFLEET_RESULT_DIR=${DITFLEET_RESULT_DIR:-$root/.run/results}
export DITFLEET_ENGINE=${DITFLEET_ENGINE:-flux}
export DITFLEET_WORKER_ID=${DITFLEET_WORKER_ID:-demo-worker}
export DITFLEET_HEARTBEAT_S=1
size=${DEMO_SIZE:-512}
steps=${DEMO_STEPS:-8}

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

"$bin/ditfleet-scheduler" >"$run/scheduler.log" 2>&1 &
pids+=($!)
"$bin/ditfleet-worker" >"$run/worker.log" 2>&1 &
pids+=($!)

echo "demo: scheduler and worker starting (logs in $run/)"
for _ in $(seq 120); do
  "$bin/ditfleetctl" workers 2>/dev/null | grep -q "$DITFLEET_WORKER_ID" && break
  sleep 0.5
done
"$bin/ditfleetctl" workers
echo
"$bin/ditfleetctl" submit --wait --timeout-s 600 \
  --prompt "${DEMO_PROMPT:-a lighthouse on a basalt cliff at dusk, oil painting}" \
  --width "$size" --height "$size" --steps "$steps" --seed 42 --tenant demo | tee "$run/result.txt"
png=$(sed -n 's/^image: //p' "$run/result.txt")
[ -s "$png" ] || { echo "demo: no image was produced" >&2; exit 1; }
echo
echo "demo: PNG at $png ($(stat -c %s "$png") bytes)"
