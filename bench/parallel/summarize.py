"""Table of ditfleet's parallel_bench JSONL lines (ours_*.jsonl) under a result dir."""
import glob
import json
import os
import sys

d = sys.argv[1] if len(sys.argv) > 1 else "."
rows = []
for f in sorted(glob.glob(os.path.join(d, "ours_*.jsonl"))) + sorted(glob.glob(os.path.join(d, "eager_*.jsonl"))):
    for line in open(f):
        line = line.strip()
        if line.startswith("{"):
            rows.append(json.loads(line))
print("| engine | size | true CFG | plan | GPUs | CUDA graphs | step ms (median) | host ms/step | loop s | e2e s | peak GiB/GPU | eff. vs own 1 GPU | latent rel L2 vs 1 GPU | PSNR dB |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
base = {}
for r in rows:
    key = (r["size"], r["true_cfg"], r.get("cuda_graphs", "-"))
    if r["plan"] == "single":
        base[key] = r["loop_s"]
    b = base.get(key)
    eff = f'{100 * b / (r["loop_s"] * r["gpus"]):.0f}%' if b else "-"
    rl2 = r.get("latent_rel_l2_vs_single")
    ps = r.get("image_psnr_vs_single_db")
    peaks = "/".join(f"{p:.1f}" for p in r.get("peak_gib", []))
    print(f'| ditfleet | {r["size"]} | {r["true_cfg"]} | {r["plan"]} | {r["gpus"]} | {r.get("cuda_graphs", "-")} | {r["step_ms_median"]:.1f} | {r.get("host_ms_median", float("nan")):.1f} | '
          f'{r["loop_s"]:.2f} | {r["e2e_s"]:.2f} | {peaks} | {eff} | '
          f'{"-" if rl2 is None else f"{rl2:.2e}"} | {"-" if ps is None else f"{ps:.1f}"} |')
