#!/usr/bin/env bash
# One device call (nvidia-h200, or nvidia-h100-x1): ditfleet's SDXL on one GPU beside diffusers on the
# same shapes (random weights, bf16, 1024², 30 Euler steps with CFG: a UNet batch of 2).
#   1. check: the fast paths' numerics on this GPU (sdxl_bench --check: fused kernels, each attention
#      kernel, every UNet/VAE formulation against fp32, a graph replay against eager);
#   2. ours_*: sdxl_bench, one process per fast-path variant (VARIANTS, then EXTRA_VARIANTS after the
#      peers): encode, 30-step loop, decode, peaks, MFU;
#   3. diffusers_eager, then diffusers compiled (DIFFUSERS_COMPILE modes, each with its compile time);
#   4. optionally 2048² (SIZE_2048=1), a kineto profile of the eager fast path and of diffusers'
#      reduce-overhead compile (PROFILE=1);
#   5. summarize.py: $OUT/summary.md (printed last) and $OUT/results.json (every stage's JSON merged);
#      $OUT/all.tgz holds each stage's JSON and log, $OUT/env.txt the machine (4 files come back).
# Carry [".gpu", ".whl"] (bench/sdxl_1gpu/prepare.sh builds them). Runs from the repository root:
#   OUT=$OUT BUDGET_S=540 bash bench/sdxl_1gpu/run.sh
# Env: BUDGET_S (default 540), SIZE (1024), STEPS (30), VARIANTS, EXTRA_VARIANTS, DIFFUSERS_COMPILE
# ("max-autotune-no-cudagraphs reduce-overhead"; "" skips), COMPILE_T (seconds per compiled stage, 300),
# RECIPE=1 (diffusers' inductor recipe for the compiled runs), SIZE_2048=1, PROFILE=1, SKIP_CHECK=1, SKIP_EAGER=1,
# BIN (default .gpu/sdxl_bench), DRY_RUN=1 (on a CPU machine: the tiny models on the CPU, 4 steps).
set -u
OUT=${OUT:-/tmp/sdxl_out}
W=$OUT/work  # per-stage JSON and logs, packed into all.tgz at the end (a call brings back 8 files)
mkdir -p "$W/logs"
BUDGET_S=${BUDGET_S:-540}
SIZE=${SIZE:-1024}
STEPS=${STEPS:-30}
HERE=bench/sdxl_1gpu
BIN=${BIN:-.gpu/sdxl_bench}
OURS_ARGS=() PEER_ARGS=()
if [[ -n "${DRY_RUN:-}" ]]; then
  SIZE=64 STEPS=4 OURS_ARGS=(--tiny --cpu) PEER_ARGS=(--tiny --device cpu)
  DIFFUSERS_COMPILE=${DIFFUSERS_COMPILE-}
fi
TORCH=$(python3 -c 'import os, torch; print(os.path.dirname(torch.__file__))' 2>/dev/null \
  || echo /opt/torch/.venv/lib/python3.12/site-packages/torch)
export LD_LIBRARY_PATH=$TORCH/lib:$TORCH/../nvidia/nccl/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# diffusers 0.42.1 with the packages it imports, carried as wheels. First the whole set (a newer
# huggingface_hub and its HTTP stack, transformers for the text encoders); if diffusers does not
# import with it over this image's packages, diffusers alone over the image's huggingface_hub.
PYSITE=
try_site() { # try_site DIR WHEEL... : installs the wheels into DIR, keeps DIR if diffusers imports
  local dir=$1; shift
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$dir" "$@" \
    > "$W/logs/pip_$(basename "$dir").txt" 2>&1 || return 1
  PYTHONPATH=$dir python3 -c "import diffusers; from diffusers import UNet2DConditionModel, AutoencoderKL, EulerDiscreteScheduler; print('diffusers', diffusers.__version__)" \
    >> "$W/logs/pip_$(basename "$dir").txt" 2>&1 || return 1
  PYSITE=$dir
}
if ls .whl/*.whl > /dev/null 2>&1; then
  try_site /tmp/site_full .whl/*.whl \
    || try_site /tmp/site_min .whl/diffusers-*.whl .whl/importlib_metadata-*.whl .whl/zipp-*.whl .whl/safetensors-*.whl \
    || echo "diffusers does not import with the carried wheels: the peer baseline is skipped (see logs/pip_*.txt)"
fi
[[ -n "$PYSITE" ]] && export PYTHONPATH=$PYSITE

{
  date -u
  nvidia-smi --query-gpu=index,name,memory.total,memory.used,clocks.sm,clocks.max.sm,power.limit --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
  [[ -n "$PYSITE" ]] && python3 -c "import diffusers; print('diffusers', diffusers.__version__)"
  [[ -n "$PYSITE" ]] && python3 -c "import transformers; print('transformers', transformers.__version__)" 2>&1 | tail -1
  echo "site: ${PYSITE:-none}"
  ldd "$BIN" | grep -E "torch_cuda|c10_cuda"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

left() { echo $(( BUDGET_S - SECONDS )); }
stage() { # stage NAME TIMEOUT CMD... (stdout+stderr -> logs/NAME.log, GPU memory sampled -> logs/mem_NAME.txt)
  local name=$1 t=$2; shift 2
  local l; l=$(left)
  (( t > l )) && t=$l
  if (( t < ${MIN_T:-25} )); then echo "== $name: skipped, ${l}s left"; return; fi
  echo "== $name (timeout ${t}s, t=${SECONDS}s)"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$W/logs/mem_$name.txt" 2>/dev/null &
  local smi=$!
  timeout -k 5 "$t" "$@" > "$W/logs/$name.log" 2>&1
  local rc=$?
  kill $smi 2>/dev/null; wait $smi 2>/dev/null
  echo "== $name rc=$rc at t=${SECONDS}s"
  (( rc != 0 )) && tail -4 "$W/logs/$name.log"
  return 0
}
ours() { # ours VARIANT [SIZE STEPS]: one sdxl_bench process
  local v=$1 size=${2:-$SIZE} steps=${3:-$STEPS}
  local n=ours_${size}_${v//[,=]/_}
  stage "$n" "${OURS_T:-90}" "$BIN" --variant "$v" --size "$size" --steps "$steps" --json-out "$W/$n.json" \
    "${OURS_ARGS[@]}"
}
peer() { # peer NAME TIMEOUT ARGS...: the diffusers baseline
  local n=$1 t=$2; shift 2
  [[ -z "$PYSITE" ]] && { echo "== $n: skipped (no diffusers)"; return; }
  stage "$n" "$t" python3 "$HERE/sdxl_diffusers_baseline.py" --json-out "$W/$n.json" "$@" "${PEER_ARGS[@]}"
}

[[ -z "${SKIP_CHECK:-}" ]] && stage check 150 "$BIN" --check --size "$SIZE" --json-out "$W/check.json" "${OURS_ARGS[@]}"
for v in ${VARIANTS:-reference graphs cl cl,graphs cl,fused all all,attn=cudnn}; do ours "$v"; done
[[ -z "${SKIP_EAGER:-}" ]] && peer diffusers_eager 150 --size "$SIZE" --steps "$STEPS"
recipe=(); [[ -n "${RECIPE:-}" ]] && recipe=(--recipe)
for m in ${DIFFUSERS_COMPILE-max-autotune-no-cudagraphs reduce-overhead}; do
  prof=(); [[ -n "${PROFILE:-}" && $m == reduce-overhead ]] && prof=(--profile /tmp/diffusers_trace.json)
  MIN_T=120 peer "diffusers_compile_${m//-/_}" "${COMPILE_T:-300}" --size "$SIZE" --steps "$STEPS" \
    --compile "$m" --channels-last "${recipe[@]}" "${prof[@]}"
done
[[ -e /tmp/diffusers_trace.json ]] && python3 bench/flux_1gpu/profile_summary.py /tmp/diffusers_trace.json \
  --steps 2 --json-out "$W/profile_diffusers.json" > "$W/logs/profile_diffusers_summary.txt" 2>&1
for v in ${EXTRA_VARIANTS:-all,attn=flash all,-fused all,-qkv}; do ours "$v"; done
if [[ -n "${SIZE_2048:-}" ]]; then
  ours all 2048 "${STEPS_2048:-10}"
  ours reference 2048 "${STEPS_2048:-10}"
  peer diffusers_eager_2048 150 --size 2048 --steps "${STEPS_2048:-10}"
fi
if [[ -n "${PROFILE:-}" ]]; then
  # Eager (no graphs), so that kineto attributes every kernel; two denoiser steps.
  stage profile 90 "$BIN" --variant all,-graphs --size "$SIZE" --steps 4 --repeats 1 \
    --profile /tmp/sdxl_trace.json --json-out "$W/profile_run.json" "${OURS_ARGS[@]}"
  [[ -e /tmp/sdxl_trace.json ]] && python3 bench/flux_1gpu/profile_summary.py /tmp/sdxl_trace.json --steps 2 \
    --json-out "$W/profile.json" > "$W/logs/profile_summary.txt" 2>&1
fi
python3 "$HERE/summarize.py" "$W" --json-out "$OUT/results.json" > "$OUT/summary.md" 2> "$W/logs/summarize.err"
tar -C "$OUT" -czf "$OUT/all.tgz" work && rm -rf "$W"
cat "$OUT/summary.md"
