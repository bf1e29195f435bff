#!/usr/bin/env python3
"""Summarises a kineto Chrome trace (flux_bench --profile, or torch.profiler's export) by CUDA kernel.

    profile_summary.py TRACE.json [--steps N] [--json-out OUT.json]

Prints the GPU time per step (sum of kernel durations / N) in buckets (matmul, attention, the
engine's fused kernels, layer norm, other elementwise/copy) and the top kernels.
"""
import argparse
import collections
import json


def bucket(name: str) -> str:
    n = name.lower()
    if n.startswith("dtf_"):
        return "fused (dtf_*)"
    if any(k in n for k in ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_")) and "sdpa" not in n:
        return "matmul"
    if any(k in n for k in ("sdpa", "flash", "fmha", "cudnn", "attention")):
        return "attention"
    if "layer_norm" in n or "rms_norm" in n or "layernorm" in n:
        return "norm"
    if "copy" in n or "cat" in n:
        return "copy/cat"
    return "other elementwise"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("trace")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--json-out", default="")
    a = p.parse_args()
    events = json.load(open(a.trace))["traceEvents"]
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    by_name = collections.Counter()
    count = collections.Counter()
    for e in kernels:
        by_name[e["name"]] += e["dur"] / 1e3 / a.steps  # us -> ms per step
        count[e["name"]] += 1
    buckets = collections.Counter()
    for n, ms in by_name.items():
        buckets[bucket(n)] += ms
    total = sum(buckets.values())
    out = {
        "kernel_ms_per_step": round(total, 2),
        "buckets_ms_per_step": {k: round(v, 2) for k, v in buckets.most_common()},
        "kernel_launches_per_step": len(kernels) / a.steps,
        "top": [
            {"name": n[:110], "ms_per_step": round(ms, 2), "calls_per_step": count[n] / a.steps}
            for n, ms in by_name.most_common(25)
        ],
    }
    print(json.dumps(out, indent=1))
    if a.json_out:
        json.dump(out, open(a.json_out, "w"), indent=1)


if __name__ == "__main__":
    main()
