#!/usr/bin/env python3
"""Summary of bench/sdxl_1gpu/run.sh's stage outputs: a markdown report on stdout.

    summarize.py WORKDIR [--json-out results.json]

WORKDIR holds ours_*.json (sdxl_bench), diffusers_*.json (sdxl_diffusers_baseline.py), check.json,
profile.json and logs/mem_<stage>.txt (nvidia-smi memory.used samples, MiB). The report: one row per
engine/variant (step time, loop, speed-up over diffusers eager, MFU against the matmul rate sdxl_bench
measured on the same GPU, encode, VAE decode, peak memory), the issue's targets, what each fast path
bought (differences between variants), and the numerical checks.
"""
import argparse
import glob
import json
import os
import statistics

GIB = 2**30


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def smi_gib(work, stage):
    try:
        with open(os.path.join(work, "logs", f"mem_{stage}.txt")) as f:
            vals = [int(x) for x in f.read().split() if x.strip().isdigit()]
        return max(vals) / 1024 if vals else None
    except OSError:
        return None


def fmt(v, spec=".1f", none="–"):
    return none if v is None else format(v, spec)


def med(v):
    return statistics.median(v) if v else None


def row_ours(name, d, work):
    pk = d.get("peak_bytes") or {}
    peaks = [pk.get(k) for k in ("encode", "denoise", "decode")]
    return dict(
        name=f"ditfleet `{d.get('variant_spec', d.get('variant'))}`" + (
            f" (= `{d.get('variant')}`)" if d.get("variant_spec") not in (None, d.get("variant")) else ""),
        stage=name, size=d.get("size"), steps=d.get("steps"),
        step=d.get("step_ms_median"), loop=d.get("loop_s"), encode=med(d.get("encode_ms") or []),
        vae=d.get("vae_decode_ms_median"), decode_rgb=d.get("decode_ms_median"),
        peaks=peaks, peak=max([p for p in peaks if p is not None], default=None), smi=smi_gib(work, name),
        tflop=d.get("unet_tflop_per_step"), matmul=d.get("matmul_bf16_tflops"), compile=None,
        te_bytes=d.get("text_encoder_bytes"), graphs=(d.get("graph_captures"), d.get("graph_replays")),
        warmup=d.get("warmup_s"))


def row_peer(name, d, work):
    peaks = [d.get(k) for k in ("peak_encode_bytes", "peak_denoise_bytes", "peak_decode_bytes")]
    label = "diffusers eager" if d.get("compile") in (None, "none") else f"diffusers compile `{d.get('compile')}`"
    if d.get("channels_last"):
        label += " + channels_last"
    if d.get("recipe"):
        label += " + recipe"
    return dict(
        name=label, stage=name, size=d.get("size"), steps=d.get("steps"), step=d.get("step_ms_median"),
        loop=d.get("loop_s"), encode=med(d.get("encode_ms") or []), vae=d.get("vae_decode_ms_median"),
        decode_rgb=None, peaks=peaks, peak=max([p for p in peaks if p is not None], default=None),
        smi=smi_gib(work, name), tflop=d.get("unet_tflop_per_step"), matmul=None, compile=d.get("compile_s"),
        te=d.get("text_encoders"), warmup=None)


ORDER = ["reference", "graphs", "cl", "cl_graphs", "cl_fused", "all_-fused", "all_-qkv", "all"]


def variant_of(stage):
    """ours_<size>_<variant> -> <variant> (commas and '=' as '_')."""
    parts = stage.split("_", 2)
    return parts[2] if len(parts) == 3 else ""


def rank(r):
    """Rows in reading order: diffusers eager, diffusers compiled, then ours from the reference up."""
    st = r["stage"]
    if st.startswith("diffusers"):
        return (0 if st.startswith("diffusers_eager") else 1, 0, st)
    v = variant_of(st)
    return (2, ORDER.index(v) if v in ORDER else len(ORDER), st)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("work")
    ap.add_argument("--json-out", default="")
    a = ap.parse_args()
    W = a.work
    merged = {}
    rows = []
    for path in sorted(glob.glob(os.path.join(W, "*.json"))):
        name = os.path.basename(path)[:-5]
        d = load(path)
        merged[name] = d
        if d is None:
            continue
        if name.startswith("ours_"):
            rows.append(row_ours(name, d, W))
        elif name.startswith("diffusers_"):
            rows.append(row_peer(name, d, W))
    matmul = med([r["matmul"] for r in rows if r["matmul"]])
    env = ""
    try:
        with open(os.path.join(os.path.dirname(os.path.abspath(W)), "env.txt")) as f:
            env = f.read().strip()
    except OSError:
        pass
    print("# SDXL on one GPU: ditfleet vs diffusers (random weights, bf16, CFG batch 2)\n")
    if env:
        print("```\n" + env + "\n```\n")
    print(f"bf16 matmul rate measured by sdxl_bench on this GPU (8192³, median of its runs): "
          f"{fmt(matmul, '.0f')} TFLOP/s. MFU = UNet step FLOPs (counted from the shapes) / step time / that rate.\n")
    for size in sorted({r["size"] for r in rows if r["size"]}):
        rs = sorted((r for r in rows if r["size"] == size), key=rank)
        eager = next((r for r in rs if r["stage"].startswith("diffusers_eager")), None)
        print(f"## {size}x{size}, {rs[0]['steps']} steps\n")
        print("| engine / variant | step ms (median) | loop s | vs diffusers eager | MFU | encode ms | VAE decode ms "
              "| peak alloc GiB (encode / denoise / decode) | nvidia-smi max GiB | compile s |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in rs:
            sp = eager["step"] / r["step"] if eager and r["step"] else None
            mfu = r["tflop"] / (r["step"] / 1e3) / matmul if r["tflop"] and r["step"] and matmul else None
            peaks = " / ".join(fmt(p / GIB if p else None, ".2f") for p in r["peaks"])
            name = r["name"] + ("" if r.get("te", True) else " (no text encoders)")
            print(f"| {name} | {fmt(r['step'], '.2f')} | {fmt(r['loop'], '.3f')} | {fmt(sp, '.2f')}x | "
                  f"{fmt(mfu * 100 if mfu else None, '.1f')}% | {fmt(r['encode'])} | {fmt(r['vae'])} | {peaks} | "
                  f"{fmt(r['smi'], '.1f')} | {fmt(r['compile'], '.0f')} |")
        print()
        ours = [r for r in rs if r["stage"].startswith("ours_") and r["step"]]
        if not ours:
            continue
        best = min(ours, key=lambda r: r["step"])
        peers_c = [r for r in rs if r["stage"].startswith("diffusers_compile") and r["step"]]
        best_c = min(peers_c, key=lambda r: r["step"]) if peers_c else None
        print(f"Fastest ditfleet variant: {best['name']} ({fmt(best['step'], '.2f')} ms/step, "
              f"{fmt(best['loop'], '.3f')} s loop).")
        if size == 1024:
            lines = [f"- loop ≤ 1.3 s: {fmt(best['loop'], '.3f')} s → {'met' if best['loop'] <= 1.3 else 'NOT met'}",
                     f"- step ≤ 43 ms: {fmt(best['step'], '.2f')} ms → {'met' if best['step'] <= 43 else 'NOT met'}"]
            if eager and eager["step"]:
                sp = eager["step"] / best["step"]
                lines.append(f"- ≥ 1.65x diffusers eager ({fmt(eager['step'], '.2f')} ms/step in this call): "
                             f"{sp:.2f}x → {'met' if sp >= 1.65 else 'NOT met'}")
            if best_c:
                lines.append(f"- faster than diffusers compiled ({best_c['name']}: {fmt(best_c['step'], '.2f')} ms/step): "
                             f"{'met' if best['step'] < best_c['step'] else 'NOT met'}")
            vae = min((r["vae"] for r in ours if r["vae"]), default=None)
            if vae is not None:
                lines.append(f"- VAE decode ≤ 60 ms: fastest {vae:.1f} ms → {'met' if vae <= 60 else 'NOT met'}")
            if eager and eager["peak"] and best["peak"]:
                mine = best["peak"] - (0 if eager.get("te") else (best.get("te_bytes") or 0))
                note = "" if eager.get("te") else " (ours less its text encoders' weights: diffusers ran without them)"
                lines.append(f"- peak allocated ≤ diffusers' ({eager['peak'] / GIB:.2f} GiB): ours {mine / GIB:.2f} GiB{note}"
                             f" → {'met' if mine <= eager['peak'] else 'NOT met'}")
            print("Targets (issue 17):\n" + "\n".join(lines) + "\n")
        by = {variant_of(r["stage"]): r for r in ours}
        pairs = [("reference", "graphs", "CUDA graphs"), ("reference", "cl", "channels-last"),
                 ("cl", "cl_graphs", "CUDA graphs on channels-last"), ("cl", "cl_fused", "fused kernels (no graphs)"),
                 ("cl_graphs", "all", "fused kernels + stacked projections (with graphs)"), ("all_-fused", "all", "fused kernels (A/B)"),
                 ("all", "all_attn_cudnn", "cuDNN attention instead of ATen's pick"),
                 ("all", "all_attn_flash", "flash attention instead of ATen's pick"),
                 ("reference", "all", "everything")]
        bought = [f"| {what} | `{a_}` → `{b_}` | {by[a_]['step']:.2f} → {by[b_]['step']:.2f} | "
                  f"{by[a_]['step'] - by[b_]['step']:+.2f} |"
                  for a_, b_, what in pairs if a_ in by and b_ in by]
        if bought:
            print("What each fast path bought (ms/step, same call):\n")
            print("| change | variants | step ms | saved ms |\n| --- | --- | --- | --- |")
            print("\n".join(bought) + "\n")
    chk = merged.get("check")
    if chk:
        print("## Numerical checks (sdxl_bench --check)\n")
        m = chk.get("models", {})
        for what in ("unet_rel_l2_vs_fp32", "vae_rel_l2_vs_fp32"):
            vals = m.get(what, {})
            if vals:
                print(f"{what}: " + ", ".join(f"`{k}` {v:.2e}" if isinstance(v, float) else f"`{k}` {v}"
                                             for k, v in vals.items()))
        if m.get("graph"):
            print(f"\ngraph replay: {m['graph']}")
        k = chk.get("kernels", {})
        gn = [c for c in k.get("group_norm", []) if isinstance(c.get("fused"), dict)]
        if gn:
            worst = max(gn, key=lambda c: c["fused"]["rel_l2"] / max(c["aten_bf16_rel_l2"], 1e-12))
            print(f"\nfused GroupNorm: worst rel L2 vs fp32 {worst['fused']['rel_l2']:.2e} (ATen bf16 on that case "
                  f"{worst['aten_bf16_rel_l2']:.2e}; {worst['shape']} nhwc={worst['nhwc']} add={worst['add']}); "
                  f"layout kept in every case: {all(c['fused'].get('layout_kept') for c in gn)}")
            print("fused GroupNorm ms vs ATen (+SiLU) ms: " + ", ".join(
                f"{c['shape'][1]}x{c['shape'][2]}{' nhwc' if c['nhwc'] else ''}: {c['fused']['ms']:.3f}/{c['aten_ms']:.3f}"
                for c in gn if c["silu"] and not c["add"]))
        g = k.get("geglu")
        if g and isinstance(g.get("fused"), dict):
            print(f"\nfused GEGLU: rel L2 {g['fused']['rel_l2']:.2e} (ATen bf16 {g['aten_bf16_rel_l2']:.2e}), "
                  f"{g['fused']['ms']:.3f} ms vs ATen {g['aten_ms']:.3f} ms")
        al = k.get("add_layer_norm")
        if al and isinstance(al.get("fused"), dict):
            print(f"\nfused residual add + LayerNorm: sum bit-identical to ATen's {al['fused']['sum_bit_identical']}, "
                  f"norm rel L2 {al['fused']['rel_l2']:.2e} (ATen bf16 {al['aten_bf16_rel_l2']:.2e}), "
                  f"{al['fused']['ms']:.3f} ms vs ATen {al['aten_ms']:.3f} ms")
        at = k.get("attention")
        if at:
            print("\n| attention shape | " + " | ".join(["sdpa", "cudnn", "flash", "efficient"]) + " |")
            print("| --- | --- | --- | --- | --- |")
            for shape, ks in at.items():
                cells = [f"{ks[n]['ms']:.3f} ms ({ks[n]['rel_l2']:.1e})" if "ms" in ks.get(n, {}) else "error"
                         for n in ("sdpa", "cudnn", "flash", "efficient")]
                print(f"| {shape} | " + " | ".join(cells) + " |")
        print()
    prof = merged.get("profile")
    if prof:
        print(f"## Kernel time per step (eager `all,-graphs`, kineto)\n\n{json.dumps(prof.get('buckets_ms_per_step'))}, "
              f"total {prof.get('kernel_ms_per_step')} ms in {prof.get('kernel_launches_per_step')} launches\n")
    prof = merged.get("profile_diffusers")
    if prof:
        print(f"## Kernel time per step (diffusers compiled `reduce-overhead`, kineto)\n\n"
              f"{json.dumps(prof.get('buckets_ms_per_step'))}, total {prof.get('kernel_ms_per_step')} ms in "
              f"{prof.get('kernel_launches_per_step')} launches\n")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(merged, f, indent=1)


if __name__ == "__main__":
    main()
