#!/usr/bin/env bash
# FP8 / compiled peers for Flux.1-dev on one Hopper GPU, in one device call (nvidia-h100-x1 / nvidia-h200).
# Run from the repo root on the GPU machine; carry [".whl", ".gpu"] (plus whatever else the call needs).
# Expects .gpu/bench = a copy of the shared peer scripts (caller: `cp -r /work/shared/bench .gpu/bench`)
# and .whl = the wheels listed in bench/flux_1gpu/fp8/README.md.
#   OUT=$OUT bash bench/flux_1gpu/fp8/peers.sh
# Stages (STAGES overrides the list; default "fp8_1024 xdit_u1c", plus fp8_2048 when TAO_2048=1):
#   fp8_1024   torchao FP8 (per-row) + torch.compile max-autotune fullgraph, 1024x1024   timeout 240 s
#   xdit_u1c   xDiT u1 compiled bf16 (= shared run_flux_baselines.sh stage x1c)          timeout CSTAGE_S (270)
#   fp8_2048   the same FP8 peer at 2048x2048, one timed loop                             timeout 150 s
#   bf16_1024  the torchao script with --no-quant (bf16, same compile)                   timeout 240 s
# Timeouts are cut to what is left of BUDGET_S (default 560). TAO_ARGS: extra torchao_baseline.py
# arguments (e.g. "--compile-mode max-autotune-no-cudagraphs"). JSON, logs, step-0 dumps: $OUT/logs/.
set -u
OUT=${OUT:-/tmp/peers_out}
mkdir -p "$OUT/logs"
BUDGET_S=${BUDGET_S:-560}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  > "$OUT/logs/pip.txt" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} \
  || { echo "wheel install failed"; tail -5 "$OUT/logs/pip.txt"; exit 1; }
[[ -e .gpu/bench/flux_bench_common.py ]] || { echo ".gpu/bench missing (cp -r /work/shared/bench .gpu/bench)"; exit 1; }
{
  date -u; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv
  python3 -c "import torch, diffusers, torchao, importlib.metadata as m; print('torch', torch.__version__, 'cudnn', torch.backends.cudnn.version(), 'diffusers', diffusers.__version__, 'torchao', torchao.__version__, 'xfuser', m.version('xfuser'), 'transformers', m.version('transformers'))" 2>&1 | tail -1
} > "$OUT/logs/env_peers.txt" 2>&1
cat "$OUT/logs/env_peers.txt"

STAGE_EXT=out STAGE_TAIL=5 STAGE_MIN_S=${MIN_T:-60} STAGE_KILL_S=10
. "$(dirname "$0")/../../lib.sh"
# A stage, then the result lines of its stdout.
pstage() {
  stage "$@"
  grep -E "^(RESULT|compile|compile warm-up|warm-up|run |loop run)" "$OUT/logs/$1.out" 2>/dev/null | cut -c1-600
  return 0
}

TAO=(python3 bench/flux_1gpu/fp8/torchao_baseline.py --common-dir .gpu/bench --steps 28 --warmup 2)
DEF="fp8_1024 xdit_u1c"; [[ -n "${TAO_2048:-}" ]] && DEF="$DEF fp8_2048"
for s in ${STAGES:-$DEF}; do
  case $s in
    fp8_1024) pstage torchao_fp8_1024 ${TAO_S:-240} "${TAO[@]}" --size 1024 ${TAO_ARGS:-} \
        --json-out "$OUT/logs/torchao_fp8_1024.json" --dump-out "$OUT/logs/torchao_fp8_1024_step0.pt" ;;
    fp8_2048) pstage torchao_fp8_2048 150 "${TAO[@]}" --size 2048 --repeats 1 ${TAO_ARGS:-} \
        --json-out "$OUT/logs/torchao_fp8_2048.json" --dump-out "$OUT/logs/torchao_fp8_2048_step0.pt" ;;
    bf16_1024) pstage torchao_bf16_1024 240 "${TAO[@]}" --size 1024 --no-quant ${TAO_ARGS:-} \
        --json-out "$OUT/logs/torchao_bf16_1024.json" --dump-out "$OUT/logs/torchao_bf16_1024_step0.pt" ;;
    # as run_flux_baselines.sh's x1c: whole-transformer torch.compile, mode reduce-overhead (xfuser's runner)
    xdit_u1c) STAGE_MIN_S=${CMIN_S:-150} pstage xdit_u1_compile ${CSTAGE_S:-270} python3 -m torch.distributed.run \
        --standalone --nproc_per_node=1 .gpu/bench/flux_xdit_baseline.py --compile \
        --json-out "$OUT/logs/xdit_u1_compile.json" ${XDIT_ARGS:-} ;;
    *) echo "unknown stage $s" ;;
  esac
done
