#!/usr/bin/env bash
# One device call (nvidia-h200): the engine redesign (issue 17) and LoRA (issue 18) on one GPU.
#   flux_before_after  Flux.1-dev 1024², 28 steps, bf16, random weights: the product's one-GPU
#                      pipeline (parallel_bench --plans single) and the transformer loop (flux_bench
#                      --bf16) of the engine BEFORE the redesign (.gpu/before/, built from the last
#                      commit before it) and after (.gpu/), interleaved A B B A so drift shows;
#   flux_threads       Flux's multi-GPU plans as threads on this one GPU against single (exactness of
#                      the redesigned rank code at full size; timings meaningless);
#   sdxl_plans         SDXL's plans (cfg=2, patch=2, cfg=2 x patch=2, patch=4) the same way;
#   lora               lora_bench (ranks 16/64, stacks 1/3: cold, warm, hot, switch, restore, step
#                      time merged vs base) and, on the same adapter files, diffusers'
#                      load_lora_weights + fuse_lora / unfuse_lora (tests/fixtures/lora_bench_compare.py);
#                      logs/lora_profile.json: the kernels of one warm merge of the largest stack.
# Carry [".gpu", ".whl"]. STAGES picks stages (default: all, in the order above). BUDGET_S (540).
#   OUT=$OUT bash bench/engine_1gpu/run.sh
set -u
OUT=${OUT:-/tmp/engine_out}
mkdir -p "$OUT/logs"
BUDGET_S=${BUDGET_S:-540}
TORCH=$(python3 -c 'import os, torch; print(os.path.dirname(torch.__file__))' 2>/dev/null \
  || echo /opt/torch/.venv/lib/python3.12/site-packages/torch)
export LD_LIBRARY_PATH=$TORCH/lib:$TORCH/../nvidia/nccl/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$OUT/logs/pip.txt" 2>&1 && export PYTHONPATH=/tmp/site
fi
{ date -u; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv
  python3 -c "import torch; print('torch', torch.__version__)"
  python3 -c "import diffusers, peft; print('diffusers', diffusers.__version__, 'peft', peft.__version__)" 2>&1 | tail -1
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
. "$(dirname "$0")/../lib.sh"
PB=(--plans single --devices 0 --size 1024 --steps 28 --runs 2)
if want flux_before_after; then
  stage pipeline_before_1 120 .gpu/before/parallel_bench "${PB[@]}"
  stage pipeline_after_1 120 .gpu/parallel_bench "${PB[@]}"
  stage transformer_after_1 90 .gpu/flux_bench --bf16
  stage transformer_before_1 90 .gpu/before/flux_bench --bf16
fi
if want flux_threads; then
  stage flux_threads 150 .gpu/parallel_bench --backend threads --devices 0,0 --size 1024 --steps 4 --runs 1 \
    --warmup-steps 1 --plans 'single;ulysses=2;ring=2;pipefusion=2'
fi
if want sdxl_plans; then
  stage sdxl_plans 150 .gpu/sdxl_plans --size 1024 --steps 6 --plans 'cfg=2;patch=2;cfg=2,patch=2;patch=4'
fi
if want lora; then
  stage lora_ours 330 .gpu/lora_bench --ranks 16,64 --stacks 1,3 --keep-files --dir /tmp/lb \
    --profile /tmp/lora_trace.json
  [[ -e /tmp/lora_trace.json ]] && python3 bench/flux_1gpu/profile_summary.py /tmp/lora_trace.json --steps 1 \
    > "$OUT/logs/lora_profile.json" 2>&1
  stage lora_diffusers 200 python3 tests/fixtures/lora_bench_compare.py /tmp/lb --device cuda --stacks 1,3
fi
for f in "$OUT"/logs/*.json; do echo "--- $(basename "$f")"; cut -c1-1500 "$f"; done
