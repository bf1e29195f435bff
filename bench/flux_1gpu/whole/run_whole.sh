#!/usr/bin/env bash
# One device call: the WHOLE Flux.1-dev pipeline, diffusers FluxPipeline vs `ditfleet-worker generate`.
# Builds a full-size random-weight FLUX.1-dev folder (diffusers layout, bf16, ~34 GB) on the GPU,
# then times diffusers (load, warm-up, end to end x2, stages) and ditfleet (cold start, --repeat 2
# stages) in three modes: all on cuda:0, --low-memory (text encoders loaded per request and freed),
# --devices cuda:0,cpu (text encoders on the CPU). Device memory: nvidia-smi memory.used sampled
# every 100 ms during each stage (logs/mem_STAGE.txt). Summary table last.
# Expects (relative to the repo root): .gpu/ditfleet-worker, .gpu/whole (this folder), .whl (diffusers).
#   OUT=... BUDGET_S=570 bash .gpu/whole/run_whole.sh
set -u
H=$(cd "$(dirname "$0")" && pwd)
G=$(cd "$H/.." && pwd)
OUT=${OUT:-/tmp/whole_out}
L=$OUT/logs
mkdir -p "$L"
BUDGET_S=${BUDGET_S:-570}
TORCH=$(python3 -c "import os, torch; print(os.path.dirname(torch.__file__))")
export LD_LIBRARY_PATH=$TORCH/lib PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [[ -z "${SKIP_WHL:-}" ]] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || { echo "wheel install failed"; exit 1; }
fi
BIN=${BIN:-$G/ditfleet-worker}
SIZE=${SIZE:-full}; RES=${RES:-1024}; STEPS=${STEPS:-28}; DEV=${DEV:-cuda}
PROMPT="a photo of a red fox sitting in the snow, 35mm"
shm=$(df -BG --output=avail /dev/shm 2>/dev/null | tail -1 | tr -dc 0-9); shm=${shm:-0}
if [[ -n "${MODEL_DIR:-}" ]]; then D=$MODEL_DIR; elif (( shm > 45 )); then D=/dev/shm/flux-dev-random; else D=/tmp/flux-dev-random; fi
{
  date -u; nvidia-smi --query-gpu=index,name,memory.total,memory.used,power.limit --format=csv 2>&1
  python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
  ldd "$BIN" | grep -E "torch|c10"; df -h /tmp /dev/shm; free -g; nproc; echo "model dir: $D"
} > "$L/env.txt" 2>&1
cat "$L/env.txt"

left() { echo $(( BUDGET_S - SECONDS )); }
stage() {  # stage NAME TIMEOUT CMD...
  local name=$1 t=$2; shift 2
  local l; l=$(left); (( t > l )) && t=$l
  if (( t < 15 )); then echo "== $name: skipped, ${l}s left"; return; fi
  echo "== $name (timeout ${t}s, t=${SECONDS}s)"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$L/mem_$name.txt" 2>/dev/null &
  local smi=$! t0=$SECONDS s0; s0=$(date +%s.%N)
  timeout -k 5 "$t" "$@" > "$L/$name.out" 2> "$L/$name.err"
  local rc=$?
  echo "wall $(python3 -c "import time; print(round(time.time()-$s0, 2))") s rc $rc" > "$L/$name.time"
  kill $smi 2>/dev/null; wait $smi 2>/dev/null
  echo "== $name rc=$rc $(cat "$L/$name.time") at t=${SECONDS}s"
  grep -hE "ready in|stages:|^\{" "$L/$name.out" "$L/$name.err" | cut -c1-400
  (( rc != 0 )) && tail -5 "$L/$name.err"
}
GEN=("$BIN" generate --model-dir "$D" --prompt "$PROMPT" --width "$RES" --height "$RES" --steps "$STEPS" --guidance 3.5 --seed 0)

stage build 240 python3 "$H/build_pipeline.py" "$D" --size "$SIZE" --device "$DEV"
du -sh "$D"/* >> "$L/env.txt" 2>&1
stage diffusers 200 python3 "$H/diffusers_pipeline.py" "$D" --device "$DEV" --size "$RES" --steps "$STEPS" \
  --out-png "$L/diffusers.png" --json-out "$L/diffusers.json"
stage ditfleet_gpu 150 "${GEN[@]}" --devices "${DEV/cuda/cuda:0}" --repeat 2 --out "$L/ditfleet_gpu.png"
stage ditfleet_cpu_enc 170 "${GEN[@]}" --devices "${DEV/cuda/cuda:0},cpu" --repeat "${CPU_REPEAT:-1}" --out "$L/ditfleet_cpu_enc.png"
stage ditfleet_lowmem 130 "${GEN[@]}" --devices "${DEV/cuda/cuda:0}" --low-memory --repeat 2 --out "$L/ditfleet_lowmem.png"
python3 "$H/summarize.py" "$L" > "$OUT/summary.txt" 2>&1; cat "$OUT/summary.txt"
cp "$L/diffusers.png" "$L/ditfleet_gpu.png" "$OUT/" 2>/dev/null
rm -f "$L"/*.png
tar -C "$OUT" -czf "$OUT/logs.tgz" logs && rm -rf "$L"
