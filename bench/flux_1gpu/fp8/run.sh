#!/usr/bin/env bash
# One device call (nvidia-h100-x1 / nvidia-h200): Flux.1-dev in FP8 on one GPU (issue 20).
#   kernels     fp8_bench: bf16 vs FP8 linears at Flux's six projection shapes (time, error on
#               Gaussian and outlier activations), the quantising kernels against the reference
#               ops, the 8192³ bf16 / FP8 GEMM rates;
#   ours        flux_bench 1024², 28 steps, random weights: bf16, then the same weights in FP8
#               (A B B A when REPEAT=1); PROFILE=1 adds a kineto profile of 4 FP8 steps; AB=1 adds
#               FP8 without the fast accumulation and FP8 with separate quantisation passes;
#               ATTN_AB / GELU_AB / TUNE_AB=1: FP8 attention off / tanhf GELU / cuDNN's first plan
#               instead of the fastest timed one; GRAPHS=1: FP8 with the step as a CUDA graph;
#               BASE=1: FP8 with .gpu/flux_bench_base (an earlier build, its commit in the README);
#   ours2048    the same at 2048² (8 steps: STEPS_2048);
#   numerics    fp8_numerics: one forward and the 28-step loop, FP8 and bf16 against fp32 and
#               each other, decoded-image PSNR; again with outlier channels injected; ALSO=1 adds
#               the layers kept bf16 quantised too, group by group (--also all);
#   load        the build's peak GPU memory: quantising at load (which also writes a pre-quantised
#               checkpoint) against loading that checkpoint (deferred linear weights);
#   threads     parallel_bench --fp8: Flux's plans as threads on this one GPU against FP8 single;
#   peers       bench/flux_1gpu/fp8/peers.sh: diffusers + torchao float8 + compile, xDiT compiled.
# Carry [".gpu", ".whl"] (.gpu: flux_bench, fp8_bench, fp8_numerics (gzipped), bench/ = ../shared/bench).
# STAGES picks stages (default: all); PEER_STAGES is peers.sh's STAGES. BUDGET_S (570).
#   OUT=$OUT bash bench/flux_1gpu/fp8/run.sh
set -u
OUT=${OUT:-/tmp/fp8_out}
mkdir -p "$OUT/logs"
BUDGET_S=${BUDGET_S:-570}
TORCH=$(python3 -c 'import os, torch; print(os.path.dirname(torch.__file__))' 2>/dev/null \
  || echo /opt/torch/.venv/lib/python3.12/site-packages/torch)
export LD_LIBRARY_PATH=$TORCH/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
for b in flux_bench flux_bench_base fp8_bench fp8_numerics parallel_bench; do
  [[ -e .gpu/$b.gz && ! -e .gpu/$b ]] && gunzip -k .gpu/$b.gz && chmod +x .gpu/$b
done
{ date -u; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cudnn', torch.backends.cudnn.version())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
STAGE_MEM_MS=500
. "$(dirname "$0")/../../lib.sh"
show() { python3 - "$@" <<'PY'
import json, sys
for p in sys.argv[1:]:
    try:
        d = json.loads(open(p).read())
    except Exception as e:
        print(p, "unreadable:", e); continue
    keep = {k: d.get(k) for k in ("precision", "image_px", "median_step_ms", "mean_step_ms", "loop_s",
            "loop_ms_per_step", "peak_device_memory_bytes_nvml", "weight_gib", "build_s") if k in d}
    print(p.split("/")[-1], json.dumps(keep or d)[:1500])
PY
}
if want kernels; then
  stage kernels 150 .gpu/fp8_bench
  show "$OUT/logs/kernels.json"
fi
if want ours; then
  stage ours_bf16 120 .gpu/flux_bench --bf16
  stage ours_fp8 120 .gpu/flux_bench --bf16 --fp8
  if [[ -n "${AB:-}" ]]; then  # what the fast accumulation and the fused quantisation each buy
    DITFLEET_FP8_ACCUM=exact stage ours_fp8_exact_accum 120 .gpu/flux_bench --bf16 --fp8
    DITFLEET_FP8_FUSED=off stage ours_fp8_unfused 120 .gpu/flux_bench --bf16 --fp8
  fi
  if [[ -n "${ATTN_AB:-}" ]]; then  # what the FP8 attention buys: the same FP8 step, bf16 attention
    DITFLEET_FP8_ATTN=off stage ours_fp8_bf16_attention 120 .gpu/flux_bench --bf16 --fp8
  fi
  if [[ -n "${GELU_AB:-}" ]]; then  # what the GELU's sigmoid form buys: tanhf as ATen instead
    DITFLEET_GELU=exact stage ours_fp8_exact_gelu 120 .gpu/flux_bench --bf16 --fp8
  fi
  if [[ -n "${TUNE_AB:-}" ]]; then  # what timing cuDNN's FP8 attention plans buys
    DITFLEET_FP8_ATTN_TUNE=off stage ours_fp8_untuned 120 .gpu/flux_bench --bf16 --fp8
  fi
  if [[ -n "${GRAPHS:-}" ]]; then  # the FP8 step as one replayed CUDA graph
    stage ours_fp8_graphs 120 .gpu/flux_bench --bf16 --fp8 --graphs
  fi
  if [[ -n "${BASE:-}" ]]; then  # the earlier build, same call
    stage ours_fp8_base 120 .gpu/flux_bench_base --bf16 --fp8
  fi
  if [[ -n "${REPEAT:-}" ]]; then
    stage ours_fp8_2 120 .gpu/flux_bench --bf16 --fp8
    stage ours_bf16_2 120 .gpu/flux_bench --bf16
  fi
  if [[ -n "${PROFILE:-}" ]]; then
    # profile SUFFIX BINARY: a kineto profile of 4 FP8 steps, summarised into logs/profile_fp8SUFFIX.*
    profile() {
      stage "ours_fp8${1}_profile" 150 "$2" --bf16 --fp8 --steps 4 --profile "/tmp/trace_fp8$1.json"
      [[ -e /tmp/trace_fp8$1.json ]] && python3 bench/flux_1gpu/profile_summary.py "/tmp/trace_fp8$1.json" \
        --json-out "$OUT/logs/profile_fp8$1.json" > "$OUT/logs/profile_fp8$1.txt" 2>&1
    }
    profile "" .gpu/flux_bench
    [[ -n "${BASE:-}" ]] && profile _base .gpu/flux_bench_base
  fi
  show "$OUT"/logs/ours_*.json
fi
if want ours2048; then
  stage ours2048_bf16 150 .gpu/flux_bench --bf16 --size 2048 --steps "${STEPS_2048:-8}"
  stage ours2048_fp8 150 .gpu/flux_bench --bf16 --fp8 --size 2048 --steps "${STEPS_2048:-8}"
  show "$OUT"/logs/ours2048_*.json
fi
if want load; then  # the load's peak: quantising at load against a pre-quantised checkpoint
  mkdir -p /tmp/fp8ck
  stage load_quantise 200 .gpu/flux_bench --bf16 --fp8 --steps 2 --warmup 1 \
    --save-fp8 /tmp/fp8ck/ditfleet-fp8.safetensors
  stage load_prequantised 200 .gpu/flux_bench --bf16 --weights /tmp/fp8ck/ditfleet-fp8.safetensors \
    --steps 2 --warmup 1
  rm -rf /tmp/fp8ck
  python3 - "$OUT"/logs/load_*.json <<'PY'
import json, sys
for p in sys.argv[1:]:
    try:
        d = json.load(open(p))
        print(p.split("/")[-1], "build peak GiB", round(d["build_peak_allocated_bytes"] / 2**30, 2),
              "weights GiB", round(d["weight_gib"], 2), "build s", round(d["build_s"], 1))
    except Exception as e:
        print(p, "unreadable:", e)
PY
fi
if want threads; then  # FP8 plans as threads on this one GPU against FP8 single (exactness only)
  # The sequence-parallel plans attend in bf16 (cuDNN's FP8 attention is for one local attention),
  # so the exactness check against FP8 single runs single's attention in bf16 too.
  DITFLEET_FP8_ATTN=off stage fp8_threads 240 .gpu/parallel_bench --fp8 --backend threads --devices 0,0 --size 1024 --steps 4 \
    --runs 1 --warmup-steps 1 --plans 'single;ulysses=2;ring=2;pipefusion=2'
fi
if want numerics; then
  # NUMERICS_OUTLIERS_ONLY=1 skips the random-weight runs (outliers, their A/B and --also only).
  [[ -z "${NUMERICS_OUTLIERS_ONLY:-}" ]] && stage numerics 200 .gpu/fp8_numerics --loop-fp32
  stage numerics_outliers 150 .gpu/fp8_numerics --outliers
  # ATTN_AB: the same with the FP8 attention off (bf16 attention), same weights, same call.
  [[ -n "${ATTN_AB:-}" ]] && DITFLEET_FP8_ATTN=off stage numerics_outliers_bf16_attention 150 .gpu/fp8_numerics --outliers
  # What quantising the layers kept in bf16 would add (modulation, final layer, embedders).
  [[ -n "${ALSO:-}" ]] && stage numerics_also 200 .gpu/fp8_numerics --also all
  [[ -n "${ATTN_AB:-}" && -z "${NUMERICS_OUTLIERS_ONLY:-}" ]] && DITFLEET_FP8_ATTN=off stage numerics_bf16_attention 200 .gpu/fp8_numerics --loop-fp32
  show "$OUT"/logs/numerics*.json
fi
if want peers; then
  # peers.sh reads STAGES as its own list: this script's STAGES names run.sh's stages.
  STAGES=${PEER_STAGES:-} OUT=$OUT BUDGET_S=$(left) bash bench/flux_1gpu/fp8/peers.sh
fi
# Everything in one file: the device tool returns only so many files.
tar -C "$OUT" -czf "$OUT/logs.tgz" logs env.txt && rm -rf "$OUT/logs"
echo "done at t=${SECONDS}s"
