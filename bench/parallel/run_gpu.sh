#!/usr/bin/env bash
# One device call: ditfleet's multi-GPU engine (exactness vs 1 GPU + timings) and, in the same
# call, xDiT (xfuser 0.7.0) on the same shapes. Carry: .gpu (parallel_bench, comm_bench), .whl (peer
# wheels), .bench (copy of ../shared/bench). Writes JSONL/logs under $OUT; prints a table last.
#   bash bench/parallel/run_gpu.sh [ours|peers|all|diag] (default all)
# Env: DEVICES (default 0,1; any count: 0,1,2,3 or 0,...,7), SIZES (default "1024 2048"),
#      PLANS (default all: single + every valid plan over DEVICES), PEER_STAGES (default "x1 x2 x2c";
#      any xN / xNc with the carried .bench), SKIP_TRUECFG=1, GRAPHS_AB="plan;plan" (those plans
#      again with DITFLEET_CUDA_GRAPHS=off at GRAPHS_AB_SIZES, default 1024), AB_VARIANTS / AB_PLANS
#      (engine variants by environment, side by side; see below).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
WHAT=${1:-all}
DEVICES=${DEVICES:-0,1}
SIZES=${SIZES:-1024 2048}
TORCH=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))' 2>/dev/null || echo /opt/torch/.venv/lib/python3.12/site-packages/torch)
NCCL_DIR=$TORCH/../nvidia/nccl/lib
# Trap 2 of the runbook: cudarc opens "libnccl.so"; make that name resolve to torch's NCCL.
FIX=/tmp/ditfleet-nccl
mkdir -p $FIX && ln -sf "$NCCL_DIR/libnccl.so.2" $FIX/libnccl.so
export LD_LIBRARY_PATH=$FIX:$TORCH/lib:$NCCL_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
BIN=.gpu/parallel_bench
{
  nvidia-smi --query-gpu=index,name,memory.total --format=csv
  nvidia-smi topo -m
  ldd $BIN | grep -E "torch_cuda|nccl"
  echo "NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-unset}"
} > "$OUT/env.txt" 2>&1
head -4 "$OUT/env.txt"

run() { # run NAME TIMEOUT ARGS...
  local name=$1 t=$2; shift 2
  echo "== $name (t=${SECONDS}s)"
  timeout -k 10 "$t" $BIN "$@" > "$OUT/$name.jsonl" 2> "$OUT/$name.log"
  echo "== $name rc=$? at t=${SECONDS}s"
  grep -E "^(thread|Error|error)|panicked" "$OUT/$name.log" | head -5
}

if [ "${AB:-0}" = 1 ]; then
  # A/B of where NCCL runs (DITFLEET_NCCL_STREAM), 8 steps at 1024.
  for st in legacy side; do
    DITFLEET_NCCL_STREAM=$st run "ab_$st" 120 --size 1024 --steps 8 --runs 1 --devices "$DEVICES" --plans "ulysses=2;ring=2"
    grep -ho '"plan":"[^"]*"\|"step_ms_median":[0-9.]*\|"host_ms_median":[0-9.]*' "$OUT/ab_$st.jsonl" | paste -sd' '
  done
fi
if [ -x .gpu/comm_bench ] && [ "${SKIP_COMM:-0}" != 1 ]; then
  # NCCL exchange check (every mode, blocking/started, eager/graph replay) and overlap timing.
  echo "== comm_bench (t=${SECONDS}s)"
  timeout -k 10 120 .gpu/comm_bench --devices "$DEVICES" > "$OUT/comm.jsonl" 2> "$OUT/comm.log"
  echo "== comm_bench rc=$? at t=${SECONDS}s"
  python3 - "$OUT/comm.jsonl" <<'PY'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
for j in lines:
    if "check" in j and not (j["eager_ok"] and j["graph_replay_ok"]):
        print(f"  CHECK FAILED rank {j['rank']} {j['mode']} started={j['started']}: {j}")
    elif j.get("timing") and j["rank"] == 0:
        print(f"  {j['mode']}: exchange {j['exchange_us']:.0f} us ({j['exchange_gib_s']:.0f} GiB/s, {j['sent_mib']:.1f} MiB), "
              f"matmul {j['matmul_us']:.0f} us, started+matmul {j['started_exchange_plus_matmul_us']:.0f} us, hidden {j['hidden_us']:.0f} us")
checks = [j for j in lines if "check" in j]
print(f"  checks: {sum(c['eager_ok'] and c['graph_replay_ok'] for c in checks)}/{len(checks)} ok")
PY
  echo
fi
if [ -n "${AB_VARIANTS:-}" ]; then
  # Engine variants side by side, same plans, 1024², 28 steps: each entry NAME or NAME:VAR=V+VAR=V
  # (e.g. "base a2a_coll:DITFLEET_NCCL_A2A=collective no_overlap:DITFLEET_FLUX_OPT=all,-overlap").
  for v in $AB_VARIANTS; do
    name=${v%%:*}; vars=""; [ "$v" != "$name" ] && vars=${v#*:}
    ( IFS='+'; for kv in $vars; do export "$kv"; done
      [ -n "$vars" ] && echo "   $name: $vars"
      run "ab_$name" ${AB_TIMEOUT:-150} --size 1024 --steps ${STEPS:-28} --runs 1 --devices "$DEVICES" \
        --plans "${AB_PLANS:-ulysses=2;ulysses=4}" )
    grep -ho '"plan":"[^"]*"\|"step_ms_median":[0-9.]*\|"host_ms_median":[0-9.]*\|"latent_rel_l2_vs_single":[0-9.e-]*' \
      "$OUT/ab_$name.jsonl" | paste -sd' '
  done
fi
if [ "$WHAT" = diag ]; then
  echo "== diag (t=${SECONDS}s)"
  timeout -k 10 200 $BIN --diag --size 1024 --steps 8 --devices "$DEVICES" > "$OUT/diag.jsonl" 2> "$OUT/diag.log"
  echo "== diag rc=$?"; cat "$OUT/diag.jsonl"
  NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,P2P timeout -k 10 120 $BIN --size 1024 --steps 4 --runs 1 \
    --devices "$DEVICES" --plans "ulysses=2" > "$OUT/nccl_info.jsonl" 2> "$OUT/nccl_info.log"
  grep -E "via|Channel 00|NCCL INFO (Using|comm|P2P)" "$OUT/nccl_info.log" | head -12
  SIZES=${SIZES:-1024} STEPS=${STEPS:-8}
  run ours_pf 240 --size 1024 --steps 28 --runs 1 --devices "$DEVICES" --plans "single;pipefusion=2,patches=2,warmup=1;pipefusion=2,patches=4,warmup=1"
  WHAT=done
fi
if [ "$WHAT" != peers ] && [ "$WHAT" != done ]; then
  for s in $SIZES; do
    runs=2; [ "$s" -ge 2048 ] && runs=1
    run "ours_$s" ${SIZE_TIMEOUT:-240} --size "$s" --steps ${STEPS:-28} --runs $runs --devices "$DEVICES" \
      --plans "${PLANS:-all}"
  done
  if [ "${SKIP_TRUECFG:-0}" != 1 ]; then
    run ours_truecfg_1024 150 --size 1024 --steps ${STEPS:-28} --runs 1 --true-cfg --devices "$DEVICES" \
      --plans "${PLANS_TRUECFG:-all}"
  fi
  if [ -n "${GRAPHS_AB:-}" ]; then
    # The same plans with CUDA graphs off (eager launches), for the A/B in docs/parallel.md.
    for s in ${GRAPHS_AB_SIZES:-1024}; do
      DITFLEET_CUDA_GRAPHS=off run "eager_$s" ${SIZE_TIMEOUT:-240} --size "$s" --steps ${STEPS:-28} --runs 1 \
        --devices "$DEVICES" --plans "$GRAPHS_AB"
    done
  fi
fi
if [ "$WHAT" != ours ] && [ "$WHAT" != done ]; then
  OUT=$OUT/peers BUDGET_S=${PEER_BUDGET_S:-330} bash .bench/run_flux_baselines.sh ${PEER_STAGES:-x1 x2 x2c} \
    > "$OUT/peers.txt" 2>&1
  grep "^==" "$OUT/peers.txt"
fi
python3 bench/parallel/summarize.py "$OUT"
[ -d "$OUT/peers" ] && python3 .bench/summarize_flux_results.py "$OUT/peers"
