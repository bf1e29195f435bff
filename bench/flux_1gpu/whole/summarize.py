#!/usr/bin/env python3
"""Summary table of run_whole.sh's logs: summarize.py LOGDIR"""
import glob
import json
import os
import re
import sys

import numpy as np

L = sys.argv[1]


def read(name):
    p = os.path.join(L, name)
    return open(p, errors="replace").read() if os.path.exists(p) else ""


def mem_peak(name):
    v = [int(x) for x in read(f"mem_{name}.txt").split() if x.strip().isdigit()]
    return max(v) / 1024 if v else None  # MiB -> GiB


def png(name):
    p = os.path.join(L, name)
    if not os.path.exists(p):
        return None
    from PIL import Image
    return np.asarray(Image.open(p).convert("RGB")).astype(np.float64)


def psnr(a, b):
    if a is None or b is None or a.shape != b.shape:
        return None
    mse = ((a - b) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def ditfleet(name):
    out = read(f"{name}.out") + read(f"{name}.err")
    r = {}
    m = re.search(r"engine \S+ ready in ([\d.]+) s", out)
    r["ready_s"] = float(m.group(1)) if m else None
    runs = re.findall(r"stages: text encode (\d+) ms \| denoise (\d+) ms \| decode (\d+) ms \| generate (\d+) ms", out)
    r["runs"] = [tuple(int(x) for x in t) for t in runs]
    # libtorch's allocator peak per stage (torch.cuda.max_memory_allocated's figure), last run.
    peaks = re.findall(r"peak device memory ([\d.]+) GiB \(encode ([\d.]+), denoise ([\d.]+), decode ([\d.]+)\)", out)
    r["torch_peak_gib"] = [float(x) for x in peaks[-1]] if peaks else None
    r["peak_gib"] = mem_peak(name)
    m = re.search(r"wall ([\d.]+) s", read(f"{name}.time"))
    r["wall_s"] = float(m.group(1)) if m else None
    return r


res = {}
b = read("build.out").strip().splitlines()
res["build"] = json.loads(b[-1]) if b and b[-1].startswith("{") else None
d = json.loads(read("diffusers.json")) if read("diffusers.json") else None
res["diffusers"] = d
res["diffusers_nvml_peak_gib"] = mem_peak("diffusers")
for n in ("ditfleet_gpu", "ditfleet_lowmem", "ditfleet_cpu_enc"):
    res[n] = ditfleet(n)
imgs = {n: png(f"{n}.png") for n in ("diffusers", "ditfleet_gpu", "ditfleet_lowmem", "ditfleet_cpu_enc")}
res["psnr_db"] = {f"{a}_vs_{b}": psnr(imgs[a], imgs[b]) for a, b in
                  (("ditfleet_gpu", "diffusers"), ("ditfleet_lowmem", "ditfleet_gpu"), ("ditfleet_cpu_enc", "ditfleet_gpu"))}
for k, v in imgs.items():
    if v is not None:
        res.setdefault("image_stats", {})[k] = dict(mean=round(float(v.mean()), 2), std=round(float(v.std()), 2))
json.dump(res, open(os.path.join(L, "summary.json"), "w"), indent=1, default=str)
print(json.dumps(res, default=str))

f = lambda x, fmt="{:.0f}": "-" if x is None else fmt.format(x)  # noqa: E731
print("\n| engine | text encode ms | denoise loop ms | VAE decode ms | end to end ms | load/ready s | peak GPU (NVML used) GiB | torch peak alloc GiB |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
if d:
    print(f"| diffusers FluxPipeline | {f(d.get('encode_ms'))} | {f(d.get('loop_ms'))} | {f(d.get('decode_ms'))} | "
          f"{f(min(d['end_to_end_ms']))} (both: {d['end_to_end_ms']}) | {f(d.get('load_s'), '{:.1f}')} (+ import {d.get('import_s')}) | "
          f"{f(res['diffusers_nvml_peak_gib'], '{:.1f}')} | {d.get('peak_alloc_whole_gib')} |")
for n, label in (("ditfleet_gpu", "ditfleet (all on cuda:0)"), ("ditfleet_lowmem", "ditfleet --low-memory"),
                 ("ditfleet_cpu_enc", "ditfleet --devices cuda:0,cpu")):
    r = res[n]
    if not r["runs"]:
        print(f"| {label} | (no result) | | | | {f(r['ready_s'], '{:.1f}')} | {f(r['peak_gib'], '{:.1f}')} | |")
        continue
    last = r["runs"][-1]
    first = r["runs"][0]
    tp = r.get("torch_peak_gib")
    tps = f"{tp[0]:.2f} (encode {tp[1]:.2f}, denoise {tp[2]:.2f}, decode {tp[3]:.2f})" if tp else ""
    print(f"| {label} (run {len(r['runs'])} of {len(r['runs'])}) | {last[0]} | {last[1]} | {last[2]} | {last[3]} | "
          f"{f(r['ready_s'], '{:.1f}')} | {f(r['peak_gib'], '{:.1f}')} | {tps} |")
    if len(r["runs"]) > 1:
        print(f"| {label} (run 1, warm-up) | {first[0]} | {first[1]} | {first[2]} | {first[3]} | | | |")
print("\nPSNR (dB):", {k: (None if v is None else round(v, 2)) for k, v in res["psnr_db"].items()})
