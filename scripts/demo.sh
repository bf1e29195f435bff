#!/usr/bin/env bash
# The ditfleet demo: starts a scheduler and one worker, submits a job with
# `ditfleetctl submit --wait`, prints where the image is and how long each stage took, then
# drains both services with SIGTERM. With DITFLEET_MODEL_DIR (or FLUX_MODEL_DIR) set the worker
# serves that Flux.1 or SDXL checkpoint; without it, tiny random-weight Flux and SDXL configs
# (clearly labelled: the images are noise, the pipelines are real), and the demo submits a small
# SDXL job after the Flux one (DEMO_SDXL=0 skips it).
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

# SDXL: the tiny random-weight pipeline serves sdxl-base beside Flux when no model directory is
# set (and the simulated engine serves every model), once the job contract knows the model.
if [ "${DEMO_SDXL:-1}" = 1 ] && grep -q '"sdxl-base"' docs/job-v1.schema.json \
  && { [ "$DITFLEET_ENGINE" = simulated ] || [ -z "${DITFLEET_MODEL_DIR:-}${FLUX_MODEL_DIR:-}" ]; }; then
  sdxl_size=${DEMO_SDXL_SIZE:-256}
  echo
  "$bin/ditfleetctl" submit --wait --timeout-s 600 --model sdxl-base \
    --prompt "${DEMO_PROMPT:-a lighthouse on a basalt cliff at dusk, oil painting}" \
    --negative-prompt "blurry, low quality" \
    --width "$sdxl_size" --height "$sdxl_size" --steps "${DEMO_SDXL_STEPS:-4}" --seed 42 --tenant demo \
    | tee "$run/result-sdxl.txt"
  png=$(sed -n 's/^image: //p' "$run/result-sdxl.txt")
  [ -s "$png" ] || { echo "demo: no SDXL image was produced" >&2; exit 1; }
  echo
  echo "demo: SDXL PNG at $png ($(stat -c %s "$png") bytes)"
fi
