#!/usr/bin/env python3
"""ditfleet `flux_bench` vs diffusers on the SAME random weights and inputs, on one GPU.

One process: builds a seeded random diffusers FluxTransformer2DModel in bf16 on the GPU (FLUX.1-dev
width; --depth/--single-depth blocks), perturbs its 1-D parameters (norm scales, biases) as
tests/fixtures/flux_bench_compare.py does, writes it in the ORIGINAL single-file layout
(streaming, no host copy of the whole model), runs `flux_bench --weights ... --dump-latent ...`
as a subprocess (the model stays on the GPU here), then on the dumped inputs computes
  * step 0's transformer output with diffusers bf16 and with the same weights upcast to fp32,
  * FluxPipeline's 28-step Euler loop with diffusers bf16,
and prints relative L2 errors as JSON: ditfleet bf16 vs diffusers bf16, both vs fp32.

  python3 flux_gpu_compare.py --bin .gpu/flux_bench --depth 19 --single-depth 38 --json-out x.json
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

# The repo's tests/fixtures, from bench/flux_1gpu/ or from its carried copy .gpu/flux_1gpu/.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "fixtures"))
from flux_keys import to_original_layout  # noqa: E402

DTYPES = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16"}


def save_streaming(tensors, path):
    """safetensors file written one tensor at a time (GPU -> host -> file)."""
    names = sorted(tensors)
    header, off = {}, 0
    for n in names:
        t = tensors[n]
        nb = t.numel() * t.element_size()
        header[n] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + nb]}
        off += nb
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for n in names:
            t = tensors[n].detach().contiguous().cpu()
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return off


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--depth", type=int, default=19)
    ap.add_argument("--single-depth", type=int, default=38)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--workdir", default="/tmp/flux_cmp")
    ap.add_argument("--json-out", default="")
    ap.add_argument("--no-fp32", action="store_true", help="skip the fp32 reference forward")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--bench-args", default="", help="extra flux_bench arguments (CPU smoke test: "
                    "'--device cpu --size 256 --txt-tokens 64 --warmup 1')")
    a = ap.parse_args()
    from diffusers import FluxTransformer2DModel

    os.makedirs(a.workdir, exist_ok=True)
    dev = a.device
    res = dict(depth=a.depth, single_depth=a.single_depth, steps=a.steps)
    t0 = time.perf_counter()
    torch.manual_seed(1234)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(dev):
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=64, guidance_embeds=True, num_layers=a.depth,
            num_single_layers=a.single_depth, attention_head_dim=128, num_attention_heads=24,
            joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56))
    torch.set_default_dtype(prev)
    model = model.to(torch.bfloat16).eval()
    g = torch.Generator(device="cpu").manual_seed(99)
    for _, p in sorted(model.named_parameters()):
        if p.dim() == 1:
            p.add_((0.1 * torch.randn(p.shape, generator=g)).to(p.device, p.dtype))
    res["params"] = sum(p.numel() for p in model.parameters())
    res["build_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    wpath = os.path.join(a.workdir, "w.safetensors")
    orig = to_original_layout(model.state_dict())
    res["weights_bytes"] = save_streaming(orig, wpath)
    del orig
    if dev == "cuda":
        torch.cuda.empty_cache()
    res["write_s"] = time.perf_counter() - t0
    print(f"weights written: {res['weights_bytes']/2**30:.2f} GiB in {res['write_s']:.1f} s", flush=True)

    t0 = time.perf_counter()
    dump = os.path.join(a.workdir, "dump.safetensors")
    cmd = [a.bin, "--bf16", "--weights", wpath, "--dump-latent", dump, "--steps", str(a.steps),
           "--depth", str(a.depth), "--single-depth", str(a.single_depth)] + a.bench_args.split()
    print("+ " + " ".join(cmd), flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True)
    sys.stderr.write(p.stderr[-4000:])
    if p.returncode != 0:
        print(p.stdout[-4000:])
        raise SystemExit(f"flux_bench failed rc={p.returncode}")
    bench = json.loads(p.stdout)
    res["flux_bench_s"] = time.perf_counter() - t0
    res["flux_bench"] = {k: v for k, v in bench.items() if k != "per_step_ms"}
    os.remove(wpath)

    d = load_file(dump)
    dtype = torch.bfloat16
    x = d["noise_packed"].to(dev, dtype)
    txt = d["txt"].to(dev, dtype)
    pooled = d["pooled"].to(dev, dtype)
    guidance = d["guidance"].to(dev, torch.float32).expand(1)
    sigmas = d["sigmas"].to(dev, torch.float32)
    img_seq = x.shape[1]
    side = int(round(img_seq ** 0.5))
    img_ids = torch.zeros(side, side, 3)  # = FluxPipeline._prepare_latent_image_ids(1, side, side, ...)
    img_ids[..., 1] += torch.arange(side)[:, None]
    img_ids[..., 2] += torch.arange(side)[None, :]
    img_ids = img_ids.reshape(side * side, 3).to(dev, dtype)
    txt_ids = torch.zeros(txt.shape[1], 3, device=dev, dtype=dtype)
    timesteps = sigmas[:-1] * 1000

    # The bf16 model rounds guidance * 1000 to bf16 (3500 -> 3504); give the fp32 reference the same
    # conditioning so that its difference is precision alone.
    g_bf16 = (guidance.to(torch.bfloat16) * 1000).float() / 1000

    def fwd(m, x, t, dt):
        return m(hidden_states=x.to(dt), timestep=t.expand(1).to(dt) / 1000,
                 guidance=guidance if dt == torch.bfloat16 else g_bf16,
                 pooled_projections=pooled.to(dt), encoder_hidden_states=txt.to(dt), txt_ids=txt_ids.to(dt),
                 img_ids=img_ids.to(dt), return_dict=False)[0]

    t0 = time.perf_counter()
    v0_ours = d["v0"].to(dev, torch.float32)
    v0_bf16 = fwd(model, x, timesteps[0], dtype).float()
    res["v0_rel_l2_ditfleet_vs_diffusers_bf16"] = rel(v0_ours, v0_bf16)
    xs = x
    for i, t in enumerate(timesteps):
        v = fwd(model, xs, t, dtype)
        xs = (xs.float() + (sigmas[i + 1] - sigmas[i]) * v).to(v.dtype)
    got = d["latents"].to(dev, torch.float32)
    res["latents_rel_l2_ditfleet_vs_diffusers_bf16"] = rel(got, xs.float())
    res["latents_rel_l2_diffusers_final_vs_noise"] = rel(xs.float(), x.float())
    res["diffusers_loop_s"] = time.perf_counter() - t0
    if not a.no_fp32:
        t0 = time.perf_counter()
        model = model.float()
        if dev == "cuda":
            torch.cuda.empty_cache()
        v0_fp32 = fwd(model, x, timesteps[0], torch.float32).float()
        res["v0_rel_l2_ditfleet_bf16_vs_fp32"] = rel(v0_ours, v0_fp32)
        res["v0_rel_l2_diffusers_bf16_vs_fp32"] = rel(v0_bf16, v0_fp32)
        res["fp32_s"] = time.perf_counter() - t0
    res["finite"] = bool(torch.isfinite(got).all() and torch.isfinite(v0_ours).all())
    print("COMPARE " + json.dumps(res), flush=True)
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
