#!/usr/bin/env bash
# One device call on ONE GPU (nvidia-h200): what of the multi-GPU engine can be checked and
# measured when only one GPU is lent. Carry .gpu (flux_bench and parallel_bench, release builds).
#   1. check_fused: the fused kernels against fp32 (flux_bench --check-fused);
#   2. share_*: ONE rank's share of each plan (flux_bench --sim-plan: the rank's token slices
#      through the real UspAttention, LoopbackComm peers, CUDA graphs as the ranks run): the
#      floor under that plan's step on N GPUs (no interconnect traffic, no waiting for peers);
#   3. threads_*: every rank of each plan as a thread on this GPU (parallel_bench --backend
#      threads): the plan's own latents and image against one GPU at full size (timings mean
#      nothing: the ranks share the GPU);
#   4. profile: a kineto trace of ulysses=4's rank share at 1024 (eager), summarised.
# Env: AB=1 (the A/B runs below), OPT_AB="name:opts ..." with OPT_AB_PLANS,
#      ENV_AB="name:VAR=V+VAR=V ..." with ENV_AB_PLANS (engine variants selected by environment, each plan's 1024 share), OVERLAP_AB=1 (overlap on/off per OVERLAP_AB_PLANS, bit-identity),
#      GRAPH_PROFILE_PLANS="single ulysses=4" (graphed kineto traces: gaps and two-stream time), SHARE_PLANS_1024, SHARE_PLANS_2048, THREAD_PLANS, STEPS_2048 (default 10), SKIP_THREADS=1,
#      SKIP_PROFILE=1, SKIP_TRUECFG=1, BUDGET_S (default 570). Writes $OUT/table.md and $OUT/all.tgz (every output).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
BUDGET_S=${BUDGET_S:-570}
TORCH=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))' 2>/dev/null || echo /opt/torch/.venv/lib/python3.12/site-packages/torch)
export LD_LIBRARY_PATH=$TORCH/lib:$TORCH/../nvidia/nccl/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
FB=.gpu/flux_bench
PB=.gpu/parallel_bench
nvidia-smi --query-gpu=index,name,memory.total,clocks.max.sm --format=csv > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

stage() { # stage NAME TIMEOUT CMD...   (stdout -> NAME.json, stderr -> NAME.log)
  local name=$1 t=$2; shift 2
  local left=$(( BUDGET_S - SECONDS ))
  (( t > left )) && t=$left
  if (( t < 15 )); then echo "== $name: skipped, ${left}s left"; return; fi
  timeout -k 5 "$t" "$@" > "$OUT/$name.json" 2> "$OUT/$name.log"
  local rc=$?
  echo "== $name rc=$rc t=${SECONDS}s"
  (( rc != 0 )) && tail -3 "$OUT/$name.log"
}

stage check_fused 90 $FB --check-fused
for p in ${SHARE_PLANS_1024:-single ulysses=2 ulysses=4 ulysses=8 ring=2 ring=4 ulysses=2,ring=2 ulysses=4,ring=2}; do
  if [ "$p" = single ]; then args=(); else args=(--sim-plan "$p"); fi
  stage "share_1024_${p//[=,]/_}" 60 $FB --size 1024 --steps 28 --graphs "${args[@]}"
done
for p in ${SHARE_PLANS_2048:-single ulysses=2 ulysses=4 ulysses=8}; do
  if [ "$p" = single ]; then args=(); else args=(--sim-plan "$p"); fi
  stage "share_2048_${p//[=,]/_}" 90 $FB --size 2048 --steps "${STEPS_2048:-10}" --graphs "${args[@]}"
done
if [ -n "${AB:-}" ]; then
  # What the copy-free Ulysses layout (Opts::a2a) and the modulation table bought, same binary.
  stage ab_single_per_step_mod 60 $FB --size 1024 --steps 28 --graphs --per-step-modulation
  stage ab_ulysses_4_per_step_mod 60 $FB --size 1024 --steps 28 --graphs --sim-plan ulysses=4 --per-step-modulation
  DITFLEET_FLUX_OPT=all,-a2a stage ab_ulysses_4_no_a2a 60 $FB --size 1024 --steps 28 --graphs --sim-plan ulysses=4
  DITFLEET_FLUX_OPT=all,-a2a stage ab_ulysses_8_no_a2a 60 $FB --size 1024 --steps 28 --graphs --sim-plan ulysses=8
  DITFLEET_FLUX_OPT=all,-a2a stage ab_ulysses_2_no_a2a 60 $FB --size 1024 --steps 28 --graphs --sim-plan ulysses=2
fi
ab_shares() { # ab_shares NAME "PLANS" VAR=V...: each plan's 1024 share with the variables set
  local name=$1 plans=$2 p; shift 2
  for p in $plans; do
    args=(); [ "$p" != single ] && args=(--sim-plan "$p")
    ( for kv in "$@"; do export "$kv"; done
      stage "ab_${p//[=,]/_}_$name" 60 $FB --size 1024 --steps 28 --graphs "${args[@]}" )
  done
}
# Formulation A/B: NAME:OPTS (DITFLEET_FLUX_OPT) for each plan share of OPT_AB_PLANS.
for v in ${OPT_AB:-}; do ab_shares "${v%%:*}" "${OPT_AB_PLANS:-single ulysses=4}" "DITFLEET_FLUX_OPT=${v#*:}"; done
# Environment A/B: NAME:VAR=V+VAR=V for each plan share of ENV_AB_PLANS.
for v in ${ENV_AB:-}; do vars=${v#*:}; ab_shares "${v%%:*}" "${ENV_AB_PLANS:-ring=4}" ${vars//+/ }; done
if [ -n "${OVERLAP_AB:-}" ]; then
  # What overlapping the single blocks' MLP matmuls with the all-to-alls buys (Opts::overlap; the
  # loopback's started exchanges copy on a side stream), and whether it changes the result: the
  # same share with overlap on and off must give bit-identical latents.
  for p in ${OVERLAP_AB_PLANS:-ulysses=2 ulysses=4 ulysses=8}; do
    n=${p//[=,]/_}
    stage "ovl_on_1024_$n" 60 $FB --size 1024 --steps 28 --graphs --sim-plan "$p" --dump-latent "$OUT/ovl_on_$n.safetensors"
    DITFLEET_FLUX_OPT=all,-overlap stage "ab_${n}_no_overlap" 60 $FB --size 1024 --steps 28 --graphs --sim-plan "$p" \
      --dump-latent "$OUT/ovl_off_$n.safetensors"
    python3 - "$OUT/ovl_on_$n.safetensors" "$OUT/ovl_off_$n.safetensors" > "$OUT/ovl_same_$n.txt" 2>&1 <<'PY'
import array, json, struct, sys
def latents(path):  # safetensors by hand (stdlib only): 8-byte header size, JSON header, data
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    meta = json.loads(raw[8:8 + n])["latents"]
    assert meta["dtype"] == "F32", meta
    a, b = meta["data_offsets"]
    return raw[8 + n + a:8 + n + b]
x, y = latents(sys.argv[1]), latents(sys.argv[2])
fx, fy = array.array("f", x), array.array("f", y)
print(json.dumps({"bit_identical": x == y, "max_abs_diff": max(abs(p - q) for p, q in zip(fx, fy))}))
PY
    echo "   $p overlap on vs off: $(cat "$OUT/ovl_same_$n.txt")"
    rm -f "$OUT/ovl_on_$n.safetensors" "$OUT/ovl_off_$n.safetensors"
  done
fi
for p in ${GRAPH_PROFILE_PLANS:-}; do
  # Kineto trace of the graphed step (CUPTI records a replayed graph's kernels one by one):
  # where the timeline is idle between kernels, and how much runs on two streams at once.
  n=${p//[=,]/_}
  for o in on off; do
    [ "$o" = off ] && [ "$p" = single ] && continue
    opt=all; [ "$o" = off ] && opt=all,-overlap
    args=(); [ "$p" != single ] && args=(--sim-plan "$p")
    DITFLEET_FLUX_OPT=$opt stage "gprof_${n}_$o" 90 $FB --size 1024 --steps 4 --graphs "${args[@]}" --profile "$OUT/g_$n.json"
    python3 bench/flux_1gpu/profile_gaps.py "$OUT/g_$n.json" > "$OUT/gaps_${n}_$o.txt" 2>&1
    python3 bench/flux_1gpu/profile_summary.py "$OUT/g_$n.json" > "$OUT/gprofile_${n}_$o.txt" 2>&1
    rm -f "$OUT/g_$n.json"
  done
done
if [ -z "${SKIP_PROFILE:-}" ]; then
  stage profile_u4 60 $FB --size 1024 --steps 4 --sim-plan ulysses=4 --profile "$OUT/u4_trace.json"
  python3 bench/flux_1gpu/profile_summary.py "$OUT/u4_trace.json" > "$OUT/profile_u4.txt" 2>&1 \
    && rm -f "$OUT/u4_trace.json"
fi
if [ -z "${SKIP_THREADS:-}" ]; then
  stage threads_1024 240 $PB --backend threads --devices 0,0,0,0 --size 1024 --steps 28 --runs 1 \
    --warmup-steps 1 --plans "${THREAD_PLANS:-single;ulysses=2;ulysses=4;ring=2;ring=4;ulysses=2,ring=2;ulysses=4,text=replicated;ring=4,text=replicated;pipefusion=4,patches=4,warmup=1}"
  [ -z "${SKIP_TRUECFG:-}" ] && stage threads_truecfg_1024 150 $PB --backend threads --devices 0,0,0,0 --size 1024 --steps 28 --runs 1 \
    --warmup-steps 1 --true-cfg --plans "single;cfg=2;cfg=2,ulysses=2"
fi
python3 bench/parallel/one_gpu_summary.py "$OUT" | tee "$OUT/table.md"
# The device tool returns few files: everything in one archive beside the table.
tar czf /tmp/one_gpu.tgz -C "$OUT" . && find "$OUT" -mindepth 1 ! -name table.md -delete && mv /tmp/one_gpu.tgz "$OUT/all.tgz"
