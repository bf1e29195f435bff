#!/usr/bin/env python3
"""Peer baseline: xDiT (PyPI xfuser 0.7.0) SDXL with CFG parallel on 2 GPUs (or 1 GPU, naive).

xfuser 0.7.0's SDXL entry point is xFuserStableDiffusionXLPipeline
(xfuser/model_executor/pipelines/pipeline_stable_diffusion_xl.py; its example is
examples/sdxl_example.py): it wraps diffusers' StableDiffusionXLPipeline and, when the CFG world
size is 2, monkey-patches the UNet's forward (model_executor/patch/unet_patch.py) so that rank r
runs row r of the [negative, positive] batch and one all_gather rebuilds the batch of 2; the rest
of the pipeline (scheduler, guidance, VAE decode) runs replicated on both ranks. xfuser's
UnetRuntimeState accepts only world 1 or world 2 with CFG parallel (no sequence parallel, no
PipeFusion, no torch.compile for UNets in 0.7.0), so 1 and 2 GPUs are all it supports for SDXL.

The models: stabilityai/stable-diffusion-xl-base-1.0's UNet, VAE and both CLIP text encoders from
their configs (bench/sdxl_1gpu/sdxl_diffusers_baseline.py's, imported), RANDOM weights from
--seed, bf16 (the runtime dtype sdxl_example.py sets). No tokenizer files can be had on the GPU
machines, so the prompt is 77 random token ids through both text encoders (timed as `encode`),
and the pipeline gets prompt_embeds / pooled_prompt_embeds; no negative prompt, so SDXL's zeros
(force_zeros_for_empty_prompt), as ditfleet's sdxl_multi and the diffusers baseline run.

Timed like ditfleet's sdxl_multi: a warm-up pipeline call of --warmup-steps steps, then --repeats
timed requests (encode + the pipeline call with 30 Euler steps, guidance 5, VAE decode in bf16,
output_type "pil"), barriers around each; on rank 0, CUDA events at the first UNet call and at
every step end (callback_on_step_end): per-step ms, loop s (first UNet call to the last step's
end), decode s (last step's end to the pipeline's return: VAE decode + postprocess), e2e s (wall
time of encode + pipeline call); torch.cuda.max_memory_allocated per rank from the end of the
warm-up (all ranks' values in the JSON). --check (on by default with --cpu-test) runs the plain
diffusers pipeline (the class's UNet forward, no patch) on the same inputs afterwards and reports
the relative L2 and PSNR of xDiT's image against it.

  torchrun --nproc_per_node=2 bench/sdxl_multi/xdit_sdxl_baseline.py --size 1024 --json-out $OUT/xdit_x2.json
  torchrun --nproc_per_node=1 bench/sdxl_multi/xdit_sdxl_baseline.py --size 1024 --json-out $OUT/xdit_x1.json
  torchrun --nproc_per_node=2 bench/sdxl_multi/xdit_sdxl_baseline.py --cpu-test --tiny      # CPU, gloo
"""

import argparse
import hashlib
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "sdxl_1gpu"))
import sdxl_diffusers_baseline as B  # noqa: E402  (configs and the random-weight builder)

GIB = 2**30


def _cpu_test_patches():
    """Let xfuser run on CPU + gloo (smoke test only; never on a GPU)."""
    torch.cuda.set_device = lambda *a, **k: None
    import xfuser.envs as envs

    envs.get_torch_distributed_backend = lambda: "gloo"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg-parallel", choices=["auto", "on", "off"], default="auto",
                   help="auto: on with 2 ranks (xfuser supports nothing else for SDXL)")
    p.add_argument("--check", action="store_true", help="compare with the plain diffusers pipeline afterwards")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--cpu-test", action="store_true", help="gloo + CPU smoke test (with --tiny)")
    p.add_argument("--json-out", default="")
    a = p.parse_args()
    if a.cpu_test:
        _cpu_test_patches()
        a.check = True

    import importlib.metadata

    import diffusers
    import numpy as np
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from xfuser import xFuserArgs, xFuserStableDiffusionXLPipeline
    from xfuser.core.distributed import get_classifier_free_guidance_world_size, init_distributed_environment

    xfuser_version = importlib.metadata.version("xfuser")
    init_distributed_environment(backend="gloo" if a.cpu_test else None)
    rank, world = dist.get_rank(), dist.get_world_size()
    if a.cpu_test:
        device = torch.device("cpu")
    else:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device(f"cuda:{local}")
    cuda = device.type == "cuda"
    cfg_parallel = world == 2 if a.cfg_parallel == "auto" else a.cfg_parallel == "on"
    xargs = xFuserArgs(
        model="stabilityai/stable-diffusion-xl-base-1.0",
        use_cfg_parallel=cfg_parallel,
        height=a.size,
        width=a.size,
        num_inference_steps=a.steps,
        guidance_scale=a.guidance,
        output_type="pil",
    )
    engine_config, _input_config = xargs.create_config()
    engine_config.runtime_config.dtype = torch.bfloat16  # as examples/sdxl_example.py

    dtype = torch.bfloat16
    ucfg, vcfg = (B.TINY_UNET, B.TINY_VAE) if a.tiny else (B.SDXL_UNET, B.SDXL_VAE)
    cl, cg = (B.TINY_CLIP_L, B.TINY_CLIP_G) if a.tiny else (B.CLIP_L, B.CLIP_G)
    t0 = time.perf_counter()
    unet = B.build(UNet2DConditionModel, ucfg, device, dtype, a.seed)
    vae = B.build(AutoencoderKL, vcfg, device, dtype, a.seed + 1)
    te1 = B.build(CLIPTextModel, CLIPTextConfig(**cl), device, dtype, a.seed + 2)
    te2 = B.build(CLIPTextModelWithProjection, CLIPTextConfig(**cg), device, dtype, a.seed + 3)
    B.sync(device)
    build_s = time.perf_counter() - t0
    resident = torch.cuda.memory_allocated(device) if cuda else None
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=None, tokenizer_2=None,
                                     unet=unet, scheduler=EulerDiscreteScheduler(**B.SDXL_SCHEDULER),
                                     add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    xpipe = xFuserStableDiffusionXLPipeline(pipe, engine_config)
    cfg_world = get_classifier_free_guidance_world_size()
    patched = "forward" in vars(pipe.unet)
    if rank == 0:
        print(f"xfuser {xfuser_version} diffusers {diffusers.__version__} torch {torch.__version__}: world {world}, "
              f"cfg world {cfg_world}, UNet forward patched {patched}; built in {build_s:.1f} s", flush=True)

    g = torch.Generator("cpu").manual_seed(a.seed)
    ids = torch.randint(0, cl["vocab_size"], (1, 77), generator=g).to(device)

    def encode():
        h1 = te1(ids, output_hidden_states=True).hidden_states[-2]
        o2 = te2(ids, output_hidden_states=True)
        return torch.cat([h1, o2.hidden_states[-2]], dim=-1), o2.text_embeds

    # Step boundaries on rank 0: an event at the first UNet call of a request, one per step end.
    marks = dict(started=False, start=None, steps=[], host=[])

    def record():
        if cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return None

    unet_forward = pipe.unet.forward  # xfuser's patched forward when CFG parallel, else the module's

    def forward_marked(*args, **kwargs):
        if not marks["started"]:
            marks["started"] = True
            marks["start"] = record()
            marks["host"].append(time.perf_counter())
        return unet_forward(*args, **kwargs)

    pipe.unet.forward = forward_marked

    def on_step_end(_pipe, _i, _t, kw):
        marks["steps"].append(record())
        marks["host"].append(time.perf_counter())
        return kw

    def call(steps, output_type="pil", plain=False):
        """One request: encode + the pipeline call. Returns (images, e2e s, encode s, end event)."""
        marks.update(started=False, start=None, steps=[], host=[])
        B.sync(device)
        t = time.perf_counter()
        pos, pooled = encode()
        B.sync(device)
        enc = time.perf_counter() - t
        kwargs = dict(prompt_embeds=pos, pooled_prompt_embeds=pooled, height=a.size, width=a.size,
                      num_inference_steps=steps, guidance_scale=a.guidance, output_type=output_type,
                      generator=torch.Generator("cpu").manual_seed(a.seed), callback_on_step_end=on_step_end)
        out = (pipe if plain else xpipe)(**kwargs)
        end = record()
        B.sync(device)
        return out.images, time.perf_counter() - t, enc, end

    with torch.inference_mode():
        dist.barrier()
        t = time.perf_counter()
        call(a.warmup_steps)
        warmup_s = time.perf_counter() - t
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        runs = []
        for _ in range(a.repeats):
            dist.barrier()
            images, e2e, enc, end = call(a.steps)
            if cuda:
                evs = [marks["start"]] + marks["steps"]
                step_ms = [evs[i].elapsed_time(evs[i + 1]) for i in range(len(evs) - 1)]
                loop_s = marks["start"].elapsed_time(marks["steps"][-1]) / 1e3
                decode_s = marks["steps"][-1].elapsed_time(end) / 1e3
            else:
                h = marks["host"]
                step_ms = [(h[i + 1] - h[i]) * 1e3 for i in range(len(h) - 1)]
                loop_s, decode_s = h[-1] - h[0], None
            runs.append(dict(step_ms=step_ms, loop_s=loop_s, decode_s=decode_s, encode_s=enc, e2e_s=e2e))
        # Collectives on the process group's device (NCCL takes CUDA tensors only).
        peak = torch.tensor([float(torch.cuda.max_memory_allocated(device)) if cuda else 0.0,
                             float(torch.cuda.max_memory_reserved(device)) if cuda else 0.0],
                            dtype=torch.float64, device=device)
        peaks = [torch.zeros_like(peak) for _ in range(world)]
        dist.all_gather(peaks, peak)
        peaks = [p.cpu() for p in peaks]
        img = np.asarray(images[0], dtype=np.float64)
        digest = hashlib.sha256(np.asarray(images[0], dtype=np.uint8).tobytes()).hexdigest()
        gathered = [None] * world
        dist.all_gather_object(gathered, digest)
        ranks_agree = all(x == gathered[0] for x in gathered) if world > 1 else None
        check = None
        if a.check:
            # The plain diffusers pipeline: the class's forward (no CFG split), same inputs.
            pipe.unet.forward = lambda *args, **kwargs: type(pipe.unet).forward(pipe.unet, *args, **kwargs)
            ref_images, _, _, _ = call(a.steps, plain=True)
            ref = np.asarray(ref_images[0], dtype=np.float64)
            mse = float(((img - ref) ** 2).mean())
            check = dict(image_rel_l2_vs_plain=float(np.linalg.norm(img - ref) / max(np.linalg.norm(ref), 1e-12)),
                         image_psnr_vs_plain_db=(10 * math.log10(255.0**2 / mse)) if mse > 0 else None,
                         identical=mse == 0)

    if rank == 0:
        best = min(runs, key=lambda r: r["e2e_s"])
        steps_all = [s for r in runs for s in r["step_ms"]]
        res = dict(
            bench="xdit_sdxl_baseline", engine="xdit", xfuser=xfuser_version, diffusers=diffusers.__version__,
            torch=torch.__version__, device_name=torch.cuda.get_device_name(device) if cuda else "cpu",
            model="sdxl tiny random" if a.tiny else "sdxl-base shapes, random weights",
            gpus=world, cfg_parallel_world=cfg_world, unet_forward_patched=patched, size=a.size, steps=a.steps,
            guidance=a.guidance, build_s=build_s, warmup_s=warmup_s, resident_bytes=resident,
            step_ms=best["step_ms"], step_ms_median=statistics.median(steps_all) if steps_all else None,
            step_ms_min=min(steps_all) if steps_all else None, loop_s=best["loop_s"], encode_s=best["encode_s"],
            decode_s=best["decode_s"], e2e_s=best["e2e_s"], e2e_s_all=[r["e2e_s"] for r in runs],
            loop_s_all=[r["loop_s"] for r in runs],
            peak_alloc_gib=[float(x[0]) / GIB for x in peaks] if cuda else None,
            peak_reserved_gib=[float(x[1]) / GIB for x in peaks] if cuda else None,
            ranks_agree=ranks_agree, check=check, image_mean=float(img.mean()),
        )
        print("RESULT " + json.dumps({k: v for k, v in res.items() if k != "step_ms"}), flush=True)
        if a.json_out:
            os.makedirs(os.path.dirname(os.path.abspath(a.json_out)), exist_ok=True)
            with open(a.json_out, "w") as f:
                json.dump(res, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
