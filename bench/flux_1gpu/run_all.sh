#!/usr/bin/env bash
# One device call (nvidia-h100-x1 / nvidia-h200): diffusers eager baseline, ditfleet flux_bench with
# each set of fused formulations (DITFLEET_FLUX_OPT), correctness vs diffusers on the same weights
# (full width, reduced depth, then full size), a bf16 matmul ceiling, and a summary table.
# Expects (relative to the repo root): .gpu/flux_bench (binary), .gpu/bench (copy of the shared
# diffusers baseline scripts), .gpu/flux_1gpu (this folder), .whl (diffusers 0.39.0 wheel).
#   bash .gpu/flux_1gpu/run_all.sh            (OUT, BUDGET_S env)
set -u
G=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/flux_out}
mkdir -p "$OUT/logs"
BUDGET_S=${BUDGET_S:-570}
TORCH=$(python3 -c "import os, torch; print(os.path.dirname(torch.__file__))")
export LD_LIBRARY_PATH=$TORCH/lib PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || { echo "wheel install failed"; exit 1; }
BIN=$G/flux_bench
{
  date -u; nvidia-smi --query-gpu=index,name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv
  python3 -c "import torch, diffusers; print('torch', torch.__version__, 'cudnn', torch.backends.cudnn.version(), 'diffusers', diffusers.__version__)"
  ldd "$BIN" | grep -E "torch|c10"
} > "$OUT/logs/env.txt" 2>&1
cat "$OUT/logs/env.txt"

# bench/lib.sh: run from the repository root as bench/flux_1gpu/run_all.sh or, as earlier calls
# did, from a copy in .gpu/flux_1gpu/.
STAGE_EXT=out STAGE_MEM_MS=250 STAGE_TAIL=5
. "$(dirname "$0")/../lib.sh" 2>/dev/null || . bench/lib.sh
stage ceiling 60 python3 -c "
import torch, json
a=torch.randn(8192,8192,device='cuda',dtype=torch.bfloat16); b=torch.randn(8192,8192,device='cuda',dtype=torch.bfloat16)
for _ in range(3): a@b
torch.cuda.synchronize(); e=[torch.cuda.Event(enable_timing=True) for _ in range(2)]
e[0].record(); [a@b for _ in range(20)]; e[1].record(); torch.cuda.synchronize()
ms=e[0].elapsed_time(e[1])/20; print(json.dumps(dict(matmul_8192_bf16_ms=ms, tflops=2*8192**3/ms/1e9)))"
# The fused kernels against fp32 before any timing (CHECK_FUSED=1).
[[ -n "${CHECK_FUSED:-}" ]] && stage check_fused 90 "$BIN" --check-fused
[[ -z "${SKIP_EAGER:-}" ]] && stage diffusers_eager 170 python3 "$G/bench/flux_diffusers_baseline.py" --json-out "$OUT/logs/diffusers_eager.json"
for o in ${OPTS:-all none rope rope,rms rope,rms,mod all}; do
  n=ditfleet_${o//,/+}; n=${n//-/no}; [[ -e "$OUT/logs/$n.out" ]] && n=${n}_2
  export DITFLEET_FLUX_OPT=$o
  prof=()
  # PROFILE_OPTS: the formulations whose run also records 2 steps with the kineto profiler.
  [[ " ${PROFILE_OPTS:-} " == *" $o "* && ! -e "$OUT/logs/profile_$n.json" ]] && prof=(--profile "/tmp/trace_$n.json")
  stage "$n" 100 "$BIN" --bf16 "${prof[@]}"
  if [[ -e "/tmp/trace_$n.json" ]]; then
    python3 "$G/flux_1gpu/profile_summary.py" "/tmp/trace_$n.json" --json-out "$OUT/logs/profile_$n.json" > /dev/null
    rm -f "/tmp/trace_$n.json"
  fi
done
# GRAPH_OPTS: formulations also timed with each step's forward as a replayed CUDA graph.
for o in ${GRAPH_OPTS:-}; do
  n=ditfleet_${o//,/+}; n=${n//-/no}_graphs
  export DITFLEET_FLUX_OPT=$o
  stage "$n" 100 "$BIN" --bf16 --graphs
done
for o in ${CMP_OPTS-all}; do
  export DITFLEET_FLUX_OPT=$o
  stage "compare_2x4_${o//,/+}" 150 python3 "$G/flux_1gpu/flux_gpu_compare.py" --bin "$BIN" --depth 2 --single-depth 4 \
    --workdir /tmp/cmp24 --json-out "$OUT/logs/compare_2x4_${o//,/+}.json"
done
# diffusers with regional torch.compile (the compiled peer; DIFFUSERS_COMPILE=1), in the same call.
[[ -n "${DIFFUSERS_COMPILE:-}" ]] && stage diffusers_compile 260 python3 "$G/bench/flux_diffusers_baseline.py" \
  --compile regional --json-out "$OUT/logs/diffusers_compile.json"
export DITFLEET_FLUX_OPT=${FULL_OPT:-all}
[[ -z "${SKIP_FULL:-}" ]] && stage "compare_full_${DITFLEET_FLUX_OPT//,/+}" 330 python3 "$G/flux_1gpu/flux_gpu_compare.py" --bin "$BIN" --depth 19 --single-depth 38 \
  --workdir /tmp/cmpfull --json-out "$OUT/logs/compare_full_${DITFLEET_FLUX_OPT//,/+}.json"
[[ -n "${CHECKS:-}" ]] && stage checks 150 python3 "$G/flux_1gpu/gpu_checks.py"
python3 "$G/flux_1gpu/summarize.py" "$OUT/logs" | tee "$OUT/summary.txt"
tar -C "$OUT" -czf "$OUT/logs.tgz" logs && rm -rf "$OUT/logs"
