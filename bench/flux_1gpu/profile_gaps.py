#!/usr/bin/env python3
"""Where a kineto trace's GPU timeline is idle, and how much of it runs on two streams at once.

    profile_gaps.py TRACE.json [--steps N] [--json-out OUT.json]

Reads the GPU activities (kernels, device copies, memsets) of a Chrome trace written by
`flux_bench --profile` (eager or `--graphs`: CUPTI records the kernels of a replayed CUDA graph
one by one) and prints, per step: the span from the first activity's start to the last one's
end, the busy time (the union of all activities over all streams), the idle time between them
in buckets of gap length with the largest gaps and the activities around them, and the time
during which two or more streams were busy at once (communication overlapping computation,
e.g. the loopback side-stream copies under `Opts::overlap`).
"""
import argparse
import collections
import json

GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
BUCKETS = [(0, 2), (2, 5), (5, 20), (20, 100), (100, 1e12)]  # microseconds


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("trace")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--json-out", default="")
    a = p.parse_args()
    events = json.load(open(a.trace))["traceEvents"]
    acts = sorted(
        (float(e["ts"]), float(e["ts"]) + float(e["dur"]), e.get("args", {}).get("stream", e.get("tid")), e["name"])
        for e in events
        if e.get("cat") in GPU_CATS and "dur" in e
    )
    if not acts:
        print(json.dumps({"error": "no GPU activities in the trace"}))
        return
    span = acts[-1][1] - acts[0][0]
    for s in acts:
        span = max(span, s[1] - acts[0][0])
    # Busy = union of intervals; gaps between merged intervals.
    busy, gaps = 0.0, []
    cur_s, cur_e, cur_name = acts[0][0], acts[0][1], acts[0][3]
    for s, e, _st, name in acts[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            gaps.append((s - cur_e, cur_name, name))
            cur_s, cur_e = s, e
        elif e > cur_e:
            cur_e = e
        if e >= cur_e:
            cur_name = name
    busy += cur_e - cur_s
    # Time with >= 2 streams busy: sweep over start/end points per stream.
    points = []
    for s, e, st, _ in acts:
        points.append((s, 1, st))
        points.append((e, -1, st))
    points.sort(key=lambda x: (x[0], x[1]))
    active = collections.Counter()
    multi, last_t = 0.0, None
    for t, d, st in points:
        streams_busy = sum(1 for v in active.values() if v > 0)
        if last_t is not None and streams_busy >= 2:
            multi += t - last_t
        active[st] += d
        last_t = t
    per_stream = collections.Counter()
    for s, e, st, _ in acts:
        per_stream[str(st)] += e - s
    n = a.steps
    hist = []
    for lo, hi in BUCKETS:
        g = [x[0] for x in gaps if lo <= x[0] < hi]
        hist.append({"gap_us": f"{lo}-{hi if hi < 1e11 else 'inf'}", "count_per_step": len(g) / n, "ms_per_step": round(sum(g) / 1e3 / n, 3)})
    out = {
        "activities_per_step": len(acts) / n,
        "span_ms_per_step": round(span / 1e3 / n, 3),
        "busy_ms_per_step": round(busy / 1e3 / n, 3),
        "idle_ms_per_step": round((span - busy) / 1e3 / n, 3),
        "two_or_more_streams_busy_ms_per_step": round(multi / 1e3 / n, 3),
        "activity_ms_per_step_by_stream": {k: round(v / 1e3 / n, 3) for k, v in per_stream.most_common()},
        "gaps": hist,
        "largest_gaps": [
            {"us": round(g, 1), "after": b[:80], "before": c[:80]} for g, b, c in sorted(gaps, reverse=True)[:12]
        ],
    }
    print(json.dumps(out, indent=1))
    if a.json_out:
        json.dump(out, open(a.json_out, "w"), indent=1)


if __name__ == "__main__":
    main()
