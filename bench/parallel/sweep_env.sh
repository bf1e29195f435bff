#!/usr/bin/env bash
# Diagnostic sweep: ulysses=2 step time at 1024² (8 steps) under NCCL/CUDA settings.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TORCH=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))')
NCCL_DIR=$TORCH/../nvidia/nccl/lib
mkdir -p /tmp/ditfleet-nccl && ln -sf "$NCCL_DIR/libnccl.so.2" /tmp/ditfleet-nccl/libnccl.so
export LD_LIBRARY_PATH=/tmp/ditfleet-nccl:$TORCH/lib:$NCCL_DIR
for cfg in "base" "NCCL_LAUNCH_MODE=GROUP" "NCCL_LAUNCH_MODE=PARALLEL" "CUDA_DEVICE_MAX_CONNECTIONS=32" \
           "NCCL_PROTO=Simple" "DITFLEET_NCCL_STREAM=legacy NCCL_LAUNCH_MODE=GROUP" "NCCL_P2P_USE_CUDA_MEMCPY=1"; do
  envs=""; [ "$cfg" != base ] && envs=$cfg
  r=$(env $envs timeout 90 .gpu/parallel_bench --size 1024 --steps 8 --runs 1 --warmup-steps 2 --devices 0,1 \
        --plans "ulysses=2" 2> "$OUT/sweep_$(echo $cfg | tr ' =' '__').log" \
      | grep -o '"step_ms_median":[0-9.]*\|"host_ms_median":[0-9.]*' | paste -sd' ')
  echo "$cfg: $r"
done
