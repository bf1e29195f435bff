#!/usr/bin/env python3
"""Summary of bench/sdxl_multi/run.sh's stage outputs: a markdown report on stdout (issue 21).

    summarize.py WORKDIR [--json-out results.json]

WORKDIR holds ours_<size>.jsonl (sdxl_multi: one line per plan), xdit_x<N>_<size>.json
(xdit_sdxl_baseline.py on N ranks) and diffusers_<size>.json (bench/sdxl_1gpu's diffusers
baseline); ../env.txt describes the machine. Per size, one table:

  plan | GPUs | size | ms/step | loop s | e2e s | peak GiB per GPU | speed-up loop / e2e vs our single |
  efficiency (loop speed-up / GPUs) | rel L2 | PSNR dB | vs xDiT (xDiT's time / ours, same GPU count)

with xDiT's and diffusers' rows below ours (diffusers reports no end-to-end time: its row shows
encode + loop + VAE decode, marked ≈). Then the issue's targets, each met or not, on the loop and
on the end-to-end time: 2 GPUs ≥ 1.9x our one GPU (CFG parallel), 4 GPUs ≥ 3.2x, 8 GPUs at 2048²
≥ 6x, faster than xDiT on every GPU count it supports (1: its naive path is the diffusers
pipeline, so xDiT x1 when run, else diffusers eager; 2: CFG parallel).
"""
import argparse
import glob
import json
import math
import os
import re

TARGETS = [(2, 1.9, None, "2 GPUs ≥ 1.9x our one GPU (CFG parallel)"), (4, 3.2, None, "4 GPUs ≥ 3.2x our one GPU"),
           (8, 6.0, 2048, "8 GPUs at 2048² ≥ 6x our one GPU")]


def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
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
                    except ValueError:
                        pass
    except OSError:
        pass
    return out


def fmt(v, spec=".2f", none="–"):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    return format(v, spec)


def gib_list(v):
    """Per-GPU GiB: 'x' when all agree within 0.05 GiB (with the count), else every value."""
    v = [x for x in (v or []) if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return "–"
    if max(v) - min(v) < 0.05:
        return f"{max(v):.2f}" + (f" ×{len(v)}" if len(v) > 1 else "")
    return " / ".join(f"{x:.2f}" for x in v)


def ours_rows(d, size):
    rows = []
    for r in d:
        rows.append(dict(
            who="ours", name=f"ditfleet `{r.get('plan')}`", plan=r.get("plan"), gpus=r.get("gpus"), size=size,
            error=r.get("error"), step=r.get("step_ms_median"), loop=r.get("loop_s"), e2e=r.get("e2e_s"),
            e2e_approx=False, encode=r.get("encode_s"), decode=r.get("decode_s"),
            peak=r.get("peak_alloc_gib"), nvml=r.get("peak_nvml_gib"), rel=r.get("latent_rel_l2_vs_single"),
            psnr=r.get("image_psnr_vs_single_db"), identical=r.get("image_identical_to_single"),
            backend=r.get("backend"), perf=r.get("leader_perf")))
    return rows


def xdit_row(d, size):
    chk = d.get("check") or {}
    return dict(
        who="xdit", name=f"xDiT {d.get('xfuser')} " + ("CFG parallel" if d.get("cfg_parallel_world") == 2 else "1 GPU (naive)"),
        plan=None, gpus=d.get("gpus"), size=size, error=None, step=d.get("step_ms_median"), loop=d.get("loop_s"),
        e2e=d.get("e2e_s"), e2e_approx=False, encode=d.get("encode_s"), decode=d.get("decode_s"),
        peak=d.get("peak_alloc_gib"), nvml=None, rel=chk.get("image_rel_l2_vs_plain"), psnr=chk.get("image_psnr_vs_plain_db"),
        identical=chk.get("identical"), backend="torch.distributed", perf=None)


def diffusers_row(d, size):
    enc = d.get("encode_ms") or []
    enc_s = (sorted(enc)[len(enc) // 2] / 1e3) if enc else 0.0
    dec = d.get("vae_decode_ms_median")
    loop = d.get("loop_s")
    e2e = (enc_s + loop + (dec or 0) / 1e3) if loop is not None else None
    peaks = [d.get(k) for k in ("peak_encode_bytes", "peak_denoise_bytes", "peak_decode_bytes")]
    peaks = [p for p in peaks if p is not None]
    return dict(
        who="diffusers", name=f"diffusers {d.get('diffusers')} eager" + ("" if d.get("text_encoders") else " (no text encoders)"),
        plan=None, gpus=1, size=size, error=None, step=d.get("step_ms_median"), loop=loop, e2e=e2e, e2e_approx=True,
        encode=enc_s, decode=dec / 1e3 if dec is not None else None,
        peak=[max(peaks) / 2**30] if peaks else None, nvml=None, rel=None, psnr=None, identical=None, backend=None,
        perf=None)


def best_of(rows, gpus, key):
    c = [r for r in rows if r["who"] == "ours" and r["gpus"] == gpus and r.get(key) and not r["error"]]
    return min(c, key=lambda r: r[key]) if c else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("work")
    ap.add_argument("--json-out", default="")
    ap.add_argument("--dry-run", action="store_true", help="say that the figures are a CPU dry run's")
    a = ap.parse_args()
    W = a.work
    merged, by_size = {}, {}
    for path in sorted(glob.glob(os.path.join(W, "ours_*.jsonl"))):
        m = re.match(r"ours_(\d+)\.jsonl$", os.path.basename(path))
        if not m:
            continue
        size = int(m.group(1))
        d = load_lines(path)
        merged[f"ours_{size}"] = d
        by_size.setdefault(size, []).extend(ours_rows(d, size))
    for path in sorted(glob.glob(os.path.join(W, "xdit_x*_*.json")) + glob.glob(os.path.join(W, "diffusers_*.json"))):
        name = os.path.basename(path)[:-5]
        m = re.search(r"_(\d+)$", name)
        d = load_json(path)
        merged[name] = d
        if d is None or not m:
            continue
        size = int(m.group(1))
        by_size.setdefault(size, []).append(xdit_row(d, size) if name.startswith("xdit") else diffusers_row(d, size))
    env = ""
    try:
        with open(os.path.join(os.path.dirname(os.path.abspath(W)), "env.txt")) as f:
            env = f.read().strip()
    except OSError:
        pass
    print("# SDXL across GPUs: ditfleet's plans vs one GPU, xDiT and diffusers (issue 21)\n")
    if a.dry_run:
        print("**DRY RUN on the CPU: tiny models, ranks as threads; the times below measure nothing, only that "
              "every stage ran.**\n")
    else:
        print("SDXL base 1.0 shapes, random weights, bf16, Euler with CFG (guidance 5, zeros as the negative "
              "prompt).\n")
    if env:
        print("```\n" + env + "\n```\n")
    print("Columns: ms/step = median step time of the timed runs; loop / e2e = the fastest timed request's "
          "denoising loop and whole request (encode, loop, decode to RGB8); peak = peak allocated GiB per GPU "
          "(ours: libtorch's allocator per device; xDiT: torch.cuda.max_memory_allocated per rank; diffusers: its "
          "largest stage peak); speed-up = our single's time / the row's (loop / e2e); efficiency = loop speed-up / "
          "GPUs; rel L2 (final latents) and PSNR (RGB8 image) against our single in the same process (xDiT: its "
          "image against the plain diffusers pipeline on the same weights); vs xDiT = xDiT's time / ours on the same "
          "GPU count (loop / e2e; > 1 = ours faster).\n")
    verdicts = []
    for size in sorted(by_size):
        rows = by_size[size]
        ours = [r for r in rows if r["who"] == "ours"]
        single = next((r for r in ours if r["plan"] == "single" and not r["error"]), None)
        steps = next((x.get("steps") for x in merged.get(f"ours_{size}", []) if x.get("steps")), None)
        xd = {r["gpus"]: r for r in rows if r["who"] == "xdit"}
        diff = next((r for r in rows if r["who"] == "diffusers"), None)
        print(f"## {size}x{size}" + (f", {steps} steps" if steps else "") + "\n")
        print("| plan | GPUs | size | ms/step | loop s | e2e s | peak GiB per GPU | NVML max GiB | speed-up loop / e2e | "
              "efficiency | rel L2 | PSNR dB | vs xDiT loop / e2e |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            if r["error"]:
                print(f"| {r['name']} | {r['gpus']} | {size}² | error: {r['error'][:120]} | | | | | | | | | |")
                continue
            sp_l = single["loop"] / r["loop"] if single and r["loop"] else None
            sp_e = single["e2e"] / r["e2e"] if single and r["e2e"] else None
            eff = sp_l / r["gpus"] if sp_l and r["gpus"] else None
            x = xd.get(r["gpus"]) if r["who"] == "ours" else None
            if r["who"] == "ours" and r["gpus"] == 1 and x is None and diff is not None:
                x = diff  # xDiT on one GPU runs the diffusers pipeline unchanged
            vx = (f"{fmt(x['loop'] / r['loop'] if x and x['loop'] and r['loop'] else None)}x / "
                  f"{fmt(x['e2e'] / r['e2e'] if x and x['e2e'] and r['e2e'] else None)}x") if x else "–"
            psnr = "identical" if r.get("identical") else fmt(r["psnr"], ".1f")
            nv = max([v for v in (r["nvml"] or []) if v is not None and not math.isnan(v)], default=None)
            print(f"| {r['name']} | {r['gpus']} | {size}² | {fmt(r['step'])} | {fmt(r['loop'], '.3f')} | "
                  f"{'≈' if r['e2e_approx'] else ''}{fmt(r['e2e'], '.3f')} | {gib_list(r['peak'])} | {fmt(nv, '.1f')} | "
                  f"{fmt(sp_l)}x / {fmt(sp_e)}x | {fmt(eff * 100 if eff else None, '.0f')}% | "
                  f"{fmt(r['rel'], '.2e')} | {psnr} | {vx} |")
        print()
        if not single:
            print("No single-GPU row of ours at this size: no speed-ups.\n")
            continue
        for gpus, want, only, what in TARGETS:
            if only is not None and size != only:
                continue
            if gpus == 2:
                b = next((r for r in ours if r["plan"] == "cfg=2" and not r["error"]), None)
            else:
                b = best_of(rows, gpus, "loop")
            if b is None:
                verdicts.append(f"- {size}²: {what}: not run (no {gpus}-GPU plan here)")
                continue
            sl, se = single["loop"] / b["loop"], single["e2e"] / b["e2e"]
            verdicts.append(f"- {size}²: {what}: `{b['plan']}` {sl:.2f}x loop → {'met' if sl >= want else 'NOT met'}, "
                            f"{se:.2f}x e2e → {'met' if se >= want else 'NOT met'}")
        for gpus in (1, 2):
            x = xd.get(gpus) or (diff if gpus == 1 else None)
            b = best_of(rows, gpus, "e2e")
            if x is None or b is None:
                verdicts.append(f"- {size}²: faster than xDiT on {gpus} GPU{'s' if gpus > 1 else ''}: not run")
                continue
            label = "xDiT" if x["who"] == "xdit" else "diffusers eager (xDiT's 1-GPU path)"
            loop_ok = x["loop"] and b["loop"] < x["loop"]
            e2e_ok = x["e2e"] and b["e2e"] < x["e2e"]
            verdicts.append(f"- {size}²: faster than xDiT on {gpus} GPU{'s' if gpus > 1 else ''} ({label}: "
                            f"{fmt(x['loop'], '.3f')} s loop, {fmt(x['e2e'], '.3f')} s e2e; ours `{b['plan']}` "
                            f"{fmt(b['loop'], '.3f')} s / {fmt(b['e2e'], '.3f')} s): loop {'met' if loop_ok else 'NOT met'}, "
                            f"e2e {'met' if e2e_ok else 'NOT met'}")
    if verdicts:
        print("## Targets (issue 21)\n")
        print("\n".join(verdicts) + "\n")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(merged, f, indent=1)


if __name__ == "__main__":
    main()
