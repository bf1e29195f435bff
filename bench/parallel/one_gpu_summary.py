#!/usr/bin/env python3
"""Table of a bench/parallel/one_gpu.sh call: rank shares (flux_bench --sim-plan) and the threads
backend's exactness on one GPU (parallel_bench --backend threads).

    one_gpu_summary.py OUT_DIR
"""
import glob
import json
import os
import sys


def load_json(path):
    try:
        with open(path) as f:
            txt = f.read().strip()
        return json.loads(txt) if txt else None
    except (OSError, json.JSONDecodeError):
        return None


def load_lines(path):
    out = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass
    except OSError:
        pass
    return out


def plan_degree(plan):
    if plan == "single":
        return 1
    n = 1
    for part in plan.split(","):
        k, _, v = part.partition("=")
        if k in ("ulysses", "ring"):
            n *= int(v)
    return n


def main():
    d = sys.argv[1]
    cf = load_json(os.path.join(d, "check_fused.json"))
    if cf:
        print("## --check-fused (relative L2 vs fp32: double img / double txt / single)\n")
        for name, v in cf.items():
            if "double_img_rel_l2_vs_fp32" in v:
                print(f"- {name}: {v['double_img_rel_l2_vs_fp32']:.2e} / "
                      f"{v['double_txt_rel_l2_vs_fp32']:.2e} / {v['single_rel_l2_vs_fp32']:.2e}")
            elif "fused_rel_l2_vs_reference_o" in v:
                print(f"- {name}: fused vs reference ops, rel L2 o {v['fused_rel_l2_vs_reference_o']:.2e}, "
                      f"lse {v['fused_rel_l2_vs_reference_lse']:.2e}"
                      + (f"; bf16 accumulator into bf16: o {v['bf16_in_bf16_out_rel_l2_vs_reference_o']:.2e}, "
                         f"lse {v['bf16_in_bf16_out_rel_l2_vs_reference_lse']:.2e}"
                         if "bf16_in_bf16_out_rel_l2_vs_reference_o" in v else ""))
            elif "model_rel_l2_vs_fp32" in v:
                print(f"- {name} (2 double + 2 single blocks, whole forward): {v['model_rel_l2_vs_fp32']:.2e}")
        print()
    for size in (1024, 2048):
        rows = []
        for path in sorted(glob.glob(os.path.join(d, f"share_{size}_*.json"))):
            j = load_json(path)
            if not j:
                rows.append((os.path.basename(path)[len(f"share_{size}_"):-len(".json")], None))
                continue
            rows.append((j.get("sim_plan") or "single", j))
        if not rows:
            continue
        single = next((j for p, j in rows if p == "single" and j), None)
        print(f"## One rank's share, {size}² (flux_bench --sim-plan, CUDA graphs, LoopbackComm peers)\n")
        print("| plan | GPUs | rank tokens (txt+img) | step ms (median) | 1-GPU step / (N x share) | peak GiB |")
        print("|---|---|---|---|---|---|")
        rows.sort(key=lambda r: (plan_degree(r[0]), r[0]))
        for plan, j in rows:
            if j is None:
                print(f"| {plan} | {plan_degree(plan)} | failed | | | |")
                continue
            n = plan_degree(plan)
            tok = j.get("sim_rank0_tokens") or {"txt": j["txt_tokens"], "img": j["img_tokens"]}
            ms = j["median_step_ms"]
            eff = ""
            if single:
                eff = f"{single['median_step_ms'] / (n * ms) * 100:.0f}%"
            peak = j.get("peak_device_memory_bytes_nvml")
            peak = f"{peak / 2**30:.1f}" if peak else ""
            print(f"| {plan} | {n} | {tok['txt']}+{tok['img']} | {ms:.1f} | {eff} | {peak} |")
        print()
    ab = sorted(glob.glob(os.path.join(d, "ab_*.json")))
    if ab:
        print("## A/B at 1024² (flux_bench, CUDA graphs; `share` rows above are the defaults)\n")
        print("| run | plan share | formulations off (DITFLEET_FLUX_OPT) | modulation | step ms (median) |")
        print("|---|---|---|---|---|")
        for path in ab:
            j = load_json(path)
            name = os.path.basename(path)[3:-5]
            if not j:
                print(f"| {name} | failed | | | |")
                continue
            opts = j.get("opts", "")
            off = [kv.split(":")[0].strip() for kv in opts.strip("Opts{} ").split(",") if kv.strip().endswith("false")]
            print(f"| {name} | {j.get('sim_plan') or 'single'} | {', '.join(off) or '(none)'} | "
                  f"{j.get('modulation', '')} | {j['median_step_ms']:.1f} |")
        print()
    ovl = sorted(glob.glob(os.path.join(d, "ovl_on_1024_*.json")))
    if ovl:
        print("## Overlap of the single blocks' MLP matmuls with the all-to-alls, 1024² share\n")
        print("| plan share | step ms, overlap on | step ms, off | latents on vs off |")
        print("|---|---|---|---|")
        for path in ovl:
            n = os.path.basename(path)[len("ovl_on_1024_"):-5]
            on, off = load_json(path), load_json(os.path.join(d, f"ab_{n}_no_overlap.json"))
            same = ""
            try:
                same = open(os.path.join(d, f"ovl_same_{n}.txt")).read().strip()
            except OSError:
                pass
            f = lambda j: f"{j['median_step_ms']:.1f}" if j else "failed"
            print(f"| {n} | {f(on)} | {f(off)} | {same} |")
        print()
    for path in sorted(glob.glob(os.path.join(d, "gaps_*.txt"))):
        name = os.path.basename(path)[5:-4]
        g = load_json(path)
        run = load_json(os.path.join(d, f"gprof_{name}.json"))
        if not g or "span_ms_per_step" not in g:
            continue
        print(f"## Graphed step timeline, {name} (kineto, 4 steps profiled as 2 after the loops)\n")
        print(f"- span {g['span_ms_per_step']} ms/step, busy {g['busy_ms_per_step']}, idle {g['idle_ms_per_step']}, "
              f"two or more streams busy {g['two_or_more_streams_busy_ms_per_step']}; "
              f"{g['activities_per_step']} activities/step; by stream {g['activity_ms_per_step_by_stream']}")
        if run:
            print(f"- the same run's timed loop: median step {run['median_step_ms']:.1f} ms")
        print("- gaps: " + "; ".join(f"{h['gap_us']} us: {h['count_per_step']:.0f} = {h['ms_per_step']} ms" for h in g["gaps"]))
        print()
    prof = os.path.join(d, "profile_u4.txt")
    if os.path.exists(prof):
        print("## Profile of ulysses=4's rank share, 1024², eager\n")
        print("```")
        with open(prof) as f:
            print("".join(f.readlines()[:30]).rstrip())
        print("```\n")
    for name in ("threads_1024", "threads_truecfg_1024"):
        lines = load_lines(os.path.join(d, f"{name}.json"))
        if not lines:
            continue
        print(f"## {name}: every rank a thread on this GPU (parallel_bench --backend threads)\n")
        print("| plan | ranks | latent rel L2 vs 1 GPU | image PSNR dB | peak GiB |")
        print("|---|---|---|---|---|")
        for j in lines:
            rl2 = j.get("latent_rel_l2_vs_single")
            ps = j.get("image_psnr_vs_single_db")
            peak = max(j.get("peak_gib") or [0])
            print(f"| {j['plan']} | {j['gpus']} | {'' if rl2 is None else f'{rl2:.2e}'} | "
                  f"{'' if ps is None else f'{ps:.1f}'} | {peak:.1f} |")
        print()


if __name__ == "__main__":
    main()
