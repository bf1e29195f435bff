#!/usr/bin/env bash
# One device call per machine kind (nvidia-h100-x2 / -x4 / -x8, or their H200 kinds): ditfleet's SDXL
# plans across the host's GPUs beside xDiT and diffusers on the same shapes (issue 21). SDXL base 1.0
# shapes, random weights, bf16, 30 Euler steps with CFG (guidance 5, no negative prompt: zeros).
# For each size of SIZES (1024 2048):
#   1. ours_<size>: sdxl_multi --plans all over every GPU: single, then every UNet plan on 2, 4, 8 GPUs
#      (patch=N, cfg=2, cfg=2,patch=N; NCCL); per plan warm-up, timed runs, per-step ms, loop /
#      encode / decode / e2e s, peak memory per GPU, rel L2 of the latents and PSNR of the image vs
#      single (one JSON line each, written as each plan ends);
#   2. xdit_x2_<size>: xDiT 0.7.0's SDXL pipeline with CFG parallel on 2 GPUs (torchrun; its only
#      multi-GPU SDXL mode); XDIT_X1=1 adds its 1-GPU (naive) run;
#   3. diffusers_<size>: diffusers eager on 1 GPU (bench/sdxl_1gpu/sdxl_diffusers_baseline.py).
# Then summarize.py: $OUT/summary.md (printed last) and $OUT/results.json; $OUT/all.tgz holds every
# stage's JSON and log, $OUT/env.txt the machine (4 files come back).
# Carry [".gpu", ".whl"] (bench/sdxl_multi/prepare.sh builds them). Runs from the repository root:
#   OUT=$OUT bash bench/sdxl_multi/run.sh
# Env: BUDGET_S (default 570: every stage's timeout is cut to what is left), SIZES ("1024 2048"),
# STEPS (30), DEVICES (default: every GPU, 0,1,...), PLANS (all), RUNS (2; RUNS_BIG=1 at 2048 and up),
# OURS_T / PEER_T (stage timeouts, 240 / 150), XDIT_X1=1, SKIP_XDIT=1, SKIP_DIFFUSERS=1, BACKEND
# (nccl; threads with DEVICES=0,0: every rank a thread on one GPU, a smoke test whose times mean nothing),
# BIN (.gpu/sdxl_multi), DRY_RUN=1 (a CPU machine: the tiny models on the CPU at 64² and 128², 4 steps,
# our plans as threads over DEVICES (default 8 ranks), xDiT on 2 gloo ranks, diffusers on the CPU; the
# peers only where the wheels import).
set -u
OUT=${OUT:-/tmp/sdxl_multi_out}
W=$OUT/work  # per-stage JSON and logs, packed into all.tgz at the end
mkdir -p "$W/logs"
BUDGET_S=${BUDGET_S:-570}
SIZES=${SIZES:-1024 2048}
STEPS=${STEPS:-30}
HERE=bench/sdxl_multi
BIN=${BIN:-.gpu/sdxl_multi}
OURS_ARGS=() PEER_ARGS=() XDIT_ARGS=()
if [[ -n "${DRY_RUN:-}" ]]; then
  SIZES=${DRY_SIZES:-64 128} STEPS=${DRY_STEPS:-4}
  OURS_ARGS=(--tiny --cpu) PEER_ARGS=(--tiny --device cpu) XDIT_ARGS=(--cpu-test --tiny)
  NGPU=0 DEVICES=${DEVICES:-0,1,2,3,4,5,6,7}
else
  NGPU=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU")
  DEVICES=${DEVICES:-$(seq -s, 0 $((NGPU - 1)))}
fi
[[ -n "${BACKEND:-}" && -z "${DRY_RUN:-}" ]] && OURS_ARGS+=(--backend "$BACKEND")
TORCH=$(python3 -c 'import os, torch; print(os.path.dirname(torch.__file__))' 2>/dev/null \
  || echo /opt/torch/.venv/lib/python3.12/site-packages/torch)
NCCL_DIR=$TORCH/../nvidia/nccl/lib
# GPU-RUNBOOK trap 2: cudarc opens "libnccl.so" by name; make that name resolve to torch's own NCCL.
FIX=/tmp/ditfleet-nccl
mkdir -p $FIX && [[ -e "$NCCL_DIR/libnccl.so.2" ]] && ln -sf "$NCCL_DIR/libnccl.so.2" $FIX/libnccl.so
export LD_LIBRARY_PATH=$FIX:$TORCH/lib:$NCCL_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONDONTWRITEBYTECODE=1
# Keep NVLink multicast off (KINDS.md), also for the processes started here.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1} \
  NVSHMEM_DISABLE_NVLS=${NVSHMEM_DISABLE_NVLS:-1}

# The peers' packages, carried as wheels: the whole set first; if diffusers does not import with it
# over this image's packages, diffusers and xfuser over the image's huggingface_hub and transformers.
PYSITE= HAVE_XFUSER=
try_site() { # try_site DIR WHEEL... : installs the wheels into DIR, keeps DIR if diffusers imports
  local dir=$1; shift
  rm -rf "$dir"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$dir" "$@" \
    > "$W/logs/pip_$(basename "$dir").txt" 2>&1 || return 1
  PYTHONPATH=$dir python3 -c "import diffusers; from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel; print('diffusers', diffusers.__version__)" \
    >> "$W/logs/pip_$(basename "$dir").txt" 2>&1 || return 1
  PYSITE=$dir
}
if ls .whl/*.whl > /dev/null 2>&1; then
  try_site /tmp/site_full .whl/*.whl \
    || try_site /tmp/site_min .whl/diffusers-*.whl .whl/importlib_metadata-*.whl .whl/zipp-*.whl \
      .whl/safetensors-*.whl .whl/xfuser-*.whl .whl/yunchang-*.whl .whl/distvae-*.whl .whl/einops-*.whl \
    || echo "diffusers does not import with the carried wheels: the peer baselines are skipped (see logs/pip_*.txt)"
fi
if [[ -n "$PYSITE" ]]; then
  export PYTHONPATH=$PYSITE
  python3 -c "import xfuser; from xfuser import xFuserStableDiffusionXLPipeline" > "$W/logs/xfuser_import.txt" 2>&1 \
    && HAVE_XFUSER=1 || echo "xfuser does not import: the xDiT stages are skipped (logs/xfuser_import.txt)"
fi

{
  date -u
  echo "devices: $DEVICES (${NGPU} GPUs seen)${DRY_RUN:+ DRY_RUN on the CPU}"
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=index,name,memory.total,memory.used,clocks.sm,clocks.max.sm,power.limit --format=csv
    nvidia-smi topo -m
  fi
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'gpus', torch.cuda.device_count())"
  [[ -n "$PYSITE" ]] && python3 -c "import diffusers, transformers; print('diffusers', diffusers.__version__, 'transformers', transformers.__version__)" 2>&1 | tail -1
  [[ -n "$HAVE_XFUSER" ]] && python3 -c "import importlib.metadata as m; print('xfuser', m.version('xfuser'), 'yunchang', m.version('yunchang'), 'distvae', m.version('distvae'))" 2>&1 | tail -1
  echo "site: ${PYSITE:-none}"
  echo "NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE TORCH_SYMM_MEM_DISABLE_MULTICAST=$TORCH_SYMM_MEM_DISABLE_MULTICAST"
  ldd "$BIN" | grep -E "torch_cuda|c10_cuda|nccl"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

left() { echo $(( BUDGET_S - SECONDS )); }
stage() { # stage NAME TIMEOUT CMD... (stdout+stderr -> logs/NAME.log)
  local name=$1 t=$2; shift 2
  local l; l=$(left)
  (( t > l )) && t=$l
  if (( t < ${MIN_T:-25} )); then echo "== $name: skipped, ${l}s left"; return; fi
  echo "== $name (timeout ${t}s, t=${SECONDS}s)"
  timeout -k 10 "$t" "$@" > "$W/logs/$name.log" 2>&1
  local rc=$?
  echo "== $name rc=$rc at t=${SECONDS}s"
  (( rc != 0 )) && tail -4 "$W/logs/$name.log"
  return 0
}
ours() { # ours SIZE: every plan of PLANS over DEVICES
  local s=$1 runs=${RUNS:-2}
  (( s >= 2048 )) && runs=${RUNS_BIG:-1}
  [[ -x "$BIN" ]] || { echo "== ours_$s: skipped ($BIN missing: run bench/sdxl_multi/prepare.sh)"; return; }
  rm -f "$W/ours_$s.jsonl"
  stage "ours_$s" "${OURS_T:-240}" "$BIN" --size "$s" --steps "$STEPS" --runs "$runs" --plans "${PLANS:-all}" \
    --devices "$DEVICES" --json-out "$W/ours_$s.jsonl" "${OURS_ARGS[@]}"
  [[ -s "$W/ours_$s.jsonl" ]] && python3 - "$W/ours_$s.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    d = json.loads(line)
    if "error" in d:
        print(f"   {d['plan']}: ERROR {d['error'][:200]}")
    else:
        print(f"   {d['plan']}: {d['step_ms_median']:.2f} ms/step, loop {d['loop_s']:.3f} s, e2e {d['e2e_s']:.3f} s, "
              f"rel L2 {d.get('latent_rel_l2_vs_single')}")
PY
}
xdit() { # xdit N SIZE: xDiT on N ranks
  local n=$1 s=$2
  [[ -n "${SKIP_XDIT:-}" ]] && return
  [[ -z "$HAVE_XFUSER" ]] && { echo "== xdit_x${n}_$s: skipped (no xfuser)"; return; }
  [[ -z "${DRY_RUN:-}" ]] && (( NGPU < n )) && { echo "== xdit_x${n}_$s: skipped ($NGPU GPUs)"; return; }
  local check=(); (( s <= 1024 )) && check=(--check)
  local runs=${RUNS:-2}; (( s >= 2048 )) && runs=${RUNS_BIG:-1}
  stage "xdit_x${n}_$s" "${PEER_T:-150}" python3 -m torch.distributed.run --standalone --nproc_per_node="$n" \
    "$HERE/xdit_sdxl_baseline.py" --size "$s" --steps "$STEPS" --repeats "$runs" "${check[@]}" \
    --json-out "$W/xdit_x${n}_$s.json" "${XDIT_ARGS[@]}"
}
diffusers() { # diffusers SIZE: eager on one GPU
  local s=$1 runs=${RUNS:-2}
  [[ -n "${SKIP_DIFFUSERS:-}" ]] && return
  [[ -z "$PYSITE" ]] && { echo "== diffusers_$s: skipped (no diffusers)"; return; }
  (( s >= 2048 )) && runs=${RUNS_BIG:-1}
  stage "diffusers_$s" "${PEER_T:-150}" python3 bench/sdxl_1gpu/sdxl_diffusers_baseline.py --size "$s" --steps "$STEPS" \
    --repeats "$runs" --json-out "$W/diffusers_$s.json" "${PEER_ARGS[@]}"
}

for s in $SIZES; do
  ours "$s"
  xdit 2 "$s"
  [[ -n "${XDIT_X1:-}" ]] && xdit 1 "$s"
  diffusers "$s"
done
python3 "$HERE/summarize.py" "$W" --json-out "$OUT/results.json" ${DRY_RUN:+--dry-run} > "$OUT/summary.md" \
  2> "$W/logs/summarize.err"
tar -C "$OUT" -czf "$OUT/all.tgz" work && rm -rf "$W"
cat "$OUT/summary.md"
