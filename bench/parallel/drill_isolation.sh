#!/usr/bin/env bash
# GPU-isolation drill with the NCCL backend: ring=2 on 2 GPUs, the GPU in slot 1 fails at step 3.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TORCH=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))')
NCCL_DIR=$TORCH/../nvidia/nccl/lib
mkdir -p /tmp/ditfleet-nccl && ln -sf "$NCCL_DIR/libnccl.so.2" /tmp/ditfleet-nccl/libnccl.so
export LD_LIBRARY_PATH=/tmp/ditfleet-nccl:$TORCH/lib:$NCCL_DIR
timeout 240 .gpu/parallel_bench --size 1024 --steps 8 --devices 0,1 --plans "ring=2" --fault 1:3 \
  > "$OUT/drill.jsonl" 2> "$OUT/drill.log"
echo "rc=$?"; cat "$OUT/drill.jsonl"; grep -E "quarantined|ERROR" "$OUT/drill.log" | head -5
