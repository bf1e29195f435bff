#!/usr/bin/env python3
"""Summary table of run_all.sh's logs folder (prints markdown)."""
import glob
import json
import os
import sys

D = sys.argv[1]


def load(name):
    for p in (os.path.join(D, name + ".json"), os.path.join(D, name + ".out")):
        try:
            with open(p) as f:
                txt = f.read()
            return json.loads(txt[txt.index("{"):]) if p.endswith(".out") else json.loads(txt)
        except Exception:
            pass
    return None


def mem_gib(name):
    try:
        vals = [int(x) for x in open(os.path.join(D, f"mem_{name}.txt")).read().split() if x.strip().isdigit()]
        return max(vals) / 1024 if vals else None
    except OSError:
        return None


def flops_per_step(n_img=4096, n_txt=512, d=3072, n_dbl=19, n_sgl=38, in_ch=64, ctx=4096, mlp=4):
    """FLOPs of one transformer forward (batch 1): every matmul (2*m*n*k) + attention (QK^T and PV)."""
    L = n_img + n_txt
    dbl_lin = 2 * L * d * (3 * d + d + 2 * mlp * d)           # qkv, out proj, mlp up+down (both streams: L tokens)
    sgl_lin = 2 * L * d * ((3 + mlp) * d) + 2 * L * (1 + mlp) * d * d   # linear1, linear2
    attn = 2 * 2 * L * L * d                                   # QK^T + PV over all heads
    emb = 2 * n_img * in_ch * d + 2 * n_img * d * in_ch        # img_in, final linear
    mod = 2 * d * d * (n_dbl * 12 + n_sgl * 3 + 2)             # adaLN linears on the (1, d) vector
    parts = dict(double_linear=n_dbl * dbl_lin, single_linear=n_sgl * sgl_lin, attention=(n_dbl + n_sgl) * attn,
                 img_in_and_final=emb, modulation=mod, txt_in=2 * n_txt * ctx * d)
    return parts


parts = flops_per_step()
total = sum(v for k, v in parts.items())
ceil = load("ceiling")
peak = ceil["tflops"] if ceil else None
print("## FLOPs per step (1024x1024, 512 txt tokens, batch 1)")
for k, v in parts.items():
    print(f"- {k}: {v/1e12:.3f} TFLOP")
print(f"- total: {total/1e12:.2f} TFLOP (txt_in is computed once per generation by ditfleet, every step by diffusers)")
if peak:
    print(f"- measured bf16 matmul ceiling (8192^3, torch): {peak:.0f} TFLOP/s")
print()
rows = []
de = load("diffusers_eager")
if de:
    rows.append(("diffusers eager (SDPA)", de["step_ms_median"], de["total_s"], de["peak_alloc_gib"], mem_gib("diffusers_eager"), None))
dc = load("diffusers_compile")
if dc:
    rows.append((f"diffusers {dc.get('compile', 'compiled')} (warm-up incl. compile {sum(dc.get('warmup_step_wall_s', [0])):.0f} s)",
                 dc["step_ms_median"], dc["total_s"], dc["peak_alloc_gib"], mem_gib("diffusers_compile"), None))
for p in sorted(glob.glob(os.path.join(D, "ditfleet_*.out"))):
    n = os.path.basename(p)[:-4]
    j = load(n)
    if not j:
        rows.append((n, None, None, None, mem_gib(n), None))
        continue
    nvml = j.get("peak_device_memory_bytes_nvml")
    graphs = ", CUDA graphs" if j.get("cuda_graphs") else ""
    rows.append((f"ditfleet {n[9:]} ({j.get('opts')}{graphs})", j.get("median_step_ms"), j.get("loop_s"), None,
                 nvml / 2**30 if nvml else mem_gib(n), j.get("host_enqueue_s_unsynced_loop")))
print("| config | step ms (median) | 28 steps s | torch peak alloc GiB | device used GiB (max sampled) | host enqueue s | TFLOP/s | MFU vs ceiling |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
f = lambda v, fmt: (fmt.format(v) if isinstance(v, (int, float)) else "-")  # noqa: E731
for name, ms, loop, alloc, used, host in rows:
    tf = total / (ms / 1e3) / 1e12 if ms else None
    mfu = tf / peak if (tf and peak) else None
    print(f"| {name} | {f(ms, '{:.1f}')} | {f(loop, '{:.3f}')} | {f(alloc, '{:.1f}')} | {f(used, '{:.1f}')} | {f(host, '{:.3f}')} | {f(tf, '{:.0f}')} | {f(mfu, '{:.1%}')} |")
print()
for p in sorted(glob.glob(os.path.join(D, "compare_*.json"))):
    n = os.path.basename(p)[:-5]
    c = load(n)
    keys = [k for k in c if "rel_l2" in k] + ["finite", "params", "write_s", "flux_bench_s"]
    print(f"{n}: " + ", ".join(f"{k}={c[k]:.3g}" if isinstance(c[k], float) else f"{k}={c[k]}" for k in keys if k in c))
try:
    txt = open(os.path.join(D, "checks.out")).read()
    c = json.loads(txt[txt.index("CHECKS ") + 7:].splitlines()[0])
    top = c.pop("diffusers_profile_top", [])
    print()
    print("checks: " + json.dumps(c))
    print("diffusers top kernels (ms): " + "; ".join(f"{k} {v}" for k, v in top[:12]))
except Exception as e:  # noqa: BLE001
    print(f"checks: none ({e!r})")

cf = load("check_fused")
if cf:
    print()
    print("check_fused (1 double + 1 single block, full width, bf16 vs the same blocks in fp32, relative L2):")
    print("| formulations | double img | double txt | single |")
    print("| --- | --- | --- | --- |")
    for k, v in cf.items():
        if "double_img_rel_l2_vs_fp32" not in v:
            continue
        print(f"| {k} | {v['double_img_rel_l2_vs_fp32']:.2e} | {v['double_txt_rel_l2_vs_fp32']:.2e} | {v['single_rel_l2_vs_fp32']:.2e} |")
    if "addmm_activation_use_gelu" in cf:
        print("addmm_activation(use_gelu): " + json.dumps(cf["addmm_activation_use_gelu"]))
for p in sorted(glob.glob(os.path.join(D, "profile_*.json"))):
    pr = json.load(open(p))
    print()
    print(f"{os.path.basename(p)[:-5]}: kernels {pr['kernel_ms_per_step']} ms/step, {pr['kernel_launches_per_step']:.0f} launches/step; "
          + "; ".join(f"{k} {v}" for k, v in pr["buckets_ms_per_step"].items()))
    print("  top: " + "; ".join(f"{t['name'][:60]} {t['ms_per_step']}" for t in pr["top"][:10]))
