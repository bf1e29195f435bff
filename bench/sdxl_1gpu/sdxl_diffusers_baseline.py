#!/usr/bin/env python3
"""Peer baseline: diffusers' SDXL (UNet2DConditionModel + AutoencoderKL) on one GPU.

Builds stabilityai/stable-diffusion-xl-base-1.0's UNet and VAE from their configs (written out
below: no model hub is reachable on the GPU machines) with RANDOM weights in bf16, and the two CLIP
text encoders (transformers' CLIPTextModel / CLIPTextModelWithProjection) when transformers
imports, so that the peak memory holds what StableDiffusionXLPipeline holds. Then runs what
StableDiffusionXLPipeline.__call__ runs for one 1024x1024 image with classifier-free guidance:
the prompt encode (77 random token ids; no negative prompt, so zeros as SDXL's
force_zeros_for_empty_prompt), EulerDiscreteScheduler's 30 steps on the [negative, positive]
batch of 2 (add_text_embeds, add_time_ids (1024, 1024, 0, 0, 1024, 1024)), and
vae.decode(latents / scaling_factor) in bf16 (the pipeline upcasts only an fp16 VAE).

Timing: CUDA events around each step after a warm-up of --warmup-steps steps (which includes
torch.compile's compile, reported as compile_s), the faster of --repeats loops; the decode's
median of --decode-repeats after one warm-up; torch.cuda.max_memory_allocated per stage.

  python3 bench/sdxl_1gpu/sdxl_diffusers_baseline.py --json-out $OUT/diffusers_eager.json
  python3 bench/sdxl_1gpu/sdxl_diffusers_baseline.py --compile max-autotune-no-cudagraphs --channels-last \
      --json-out $OUT/diffusers_compile.json
  python3 bench/sdxl_1gpu/sdxl_diffusers_baseline.py --tiny --device cpu      # CPU dry run
"""

import argparse
import json
import os
import statistics
import time

import torch

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the keys that differ from defaults).
SDXL_UNET = dict(
    act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], center_input_sample=False,
    cross_attention_dim=2048, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    downsample_padding=1, dual_cross_attention=False, flip_sin_to_cos=True, freq_shift=0, in_channels=4,
    layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, out_channels=4,
    projection_class_embeddings_input_dim=2816, resnet_time_scale_shift="default", sample_size=128,
    transformer_layers_per_block=[1, 2, 10], up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    upcast_attention=None, use_linear_projection=True)
# vae/config.json
SDXL_VAE = dict(
    act_fn="silu", block_out_channels=[128, 256, 512, 512], in_channels=3, latent_channels=4, layers_per_block=2,
    norm_num_groups=32, out_channels=3, sample_size=1024, scaling_factor=0.13025, force_upcast=True,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
# scheduler/scheduler_config.json
SDXL_SCHEDULER = dict(
    beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085, interpolation_type="linear",
    num_train_timesteps=1000, prediction_type="epsilon", steps_offset=1, timestep_spacing="leading",
    use_karras_sigmas=False)
# text_encoder (CLIP ViT-L/14) and text_encoder_2 (OpenCLIP ViT-bigG/14 with projection).
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
              num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)

# The same block structure at tiny widths (CPU dry runs only).
TINY_UNET = dict(SDXL_UNET, attention_head_dim=[1, 2, 2], block_out_channels=[8, 16, 16], cross_attention_dim=32,
                 norm_num_groups=4, addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 48,
                 transformer_layers_per_block=[1, 2, 2], addition_embed_type_num_heads=4)
TINY_VAE = dict(SDXL_VAE, block_out_channels=[16, 16, 32, 32], layers_per_block=1, norm_num_groups=8)
TINY_CLIP_L = dict(CLIP_L, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                   projection_dim=16)
TINY_CLIP_G = dict(CLIP_G, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                   projection_dim=16)


def build(cls, config, device, dtype, seed):
    """cls(**config) made directly on `device` in `dtype` (random init there: fast on a GPU)."""
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            m = cls(**config) if isinstance(config, dict) else cls(config)
    finally:
        torch.set_default_dtype(prev)
    m = m.to(dtype=dtype).eval()
    m.requires_grad_(False)
    return m


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def reset_peak(dev):
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def peak(dev):
    return torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None


def timed(dev, fn):
    """(result, ms) of fn() with device synchronization around it."""
    sync(dev)
    t = time.perf_counter()
    out = fn()
    sync(dev)
    return out, (time.perf_counter() - t) * 1e3


def unet_tflop(unet_config, size):
    """FLOPs of one UNet forward on the CFG batch of 2, counted by torch's FlopCounterMode on a meta copy."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        m = UNet2DConditionModel(**unet_config)
        lat = size // 8
        x = torch.empty(2, 4, lat, lat)
        ctx = torch.empty(2, 77, unet_config["cross_attention_dim"])
        emb = unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"]
        added = {"text_embeds": torch.empty(2, emb), "time_ids": torch.empty(2, 6)}
        fc = FlopCounterMode(display=False)
        with fc, torch.no_grad():
            m(x, torch.tensor(500.0), ctx, added_cond_kwargs=added)
    return fc.get_total_flops() / 1e12


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--decode-repeats", type=int, default=3)
    p.add_argument("--compile", default="none",
                   help="none, or a torch.compile mode for the UNet: max-autotune-no-cudagraphs, reduce-overhead, "
                        "max-autotune, default")
    p.add_argument("--compile-vae", action="store_true", help="also torch.compile vae.decode (same mode)")
    p.add_argument("--channels-last", action="store_true", help="UNet and VAE in channels_last memory format")
    p.add_argument("--recipe", action="store_true",
                   help="diffusers' SDXL speed-up recipe: fused qkv projections and inductor's conv_1x1_as_mm, "
                        "coordinate-descent tuning, no epilogue fusion")
    p.add_argument("--text-encoders", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default="")
    p.add_argument("--profile", default="",
                   help="after the timings, a kineto trace (Chrome JSON) of 2 more denoising steps to this path")
    a = p.parse_args()

    import diffusers
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    dtype = torch.bfloat16
    ucfg, vcfg = (TINY_UNET, TINY_VAE) if a.tiny else (SDXL_UNET, SDXL_VAE)
    out = dict(bench="sdxl_diffusers_baseline", diffusers=diffusers.__version__, torch=torch.__version__,
               device=str(dev), gpu=torch.cuda.get_device_name(dev) if cuda else None, size=a.size, steps=a.steps,
               guidance=a.guidance, compile=a.compile, compile_vae=a.compile_vae, channels_last=a.channels_last,
               recipe=a.recipe, cfg_batch=2, model="sdxl tiny random" if a.tiny else "sdxl-base shapes, random weights")

    t0 = time.perf_counter()
    unet = build(UNet2DConditionModel, ucfg, dev, dtype, a.seed)
    vae = build(AutoencoderKL, vcfg, dev, dtype, a.seed + 1)
    te = None
    if a.text_encoders != "off":
        try:
            from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

            cl, cg = (TINY_CLIP_L, TINY_CLIP_G) if a.tiny else (CLIP_L, CLIP_G)
            te = (build(CLIPTextModel, CLIPTextConfig(**cl), dev, dtype, a.seed + 2),
                  build(CLIPTextModelWithProjection, CLIPTextConfig(**cg), dev, dtype, a.seed + 3))
            import transformers
            out["transformers"] = transformers.__version__
        except Exception as e:  # noqa: BLE001 - the baseline runs without them, and says so
            if a.text_encoders == "on":
                raise
            out["text_encoders_error"] = f"{type(e).__name__}: {e}"
    sync(dev)
    out["build_s"] = time.perf_counter() - t0
    out["text_encoders"] = te is not None
    out["params"] = dict(unet=sum(x.numel() for x in unet.parameters()),
                         vae=sum(x.numel() for x in vae.parameters()),
                         text_encoders=sum(x.numel() for m in te for x in m.parameters()) if te else 0)
    out["resident_bytes"] = torch.cuda.memory_allocated(dev) if cuda else None
    out["attn_processor"] = type(unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.processor).__name__

    if a.recipe:
        unet.fuse_qkv_projections()
        vae.fuse_qkv_projections()
        if a.compile != "none":
            import torch._inductor.config as cfg
            cfg.conv_1x1_as_mm = True
            cfg.coordinate_descent_tuning = True
            cfg.epilogue_fusion = False
            cfg.coordinate_descent_check_all_directions = True
    if a.channels_last:
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    eager_unet, eager_decode = unet, vae.decode
    if a.compile != "none":
        unet = torch.compile(unet, mode=a.compile, fullgraph=True)
        if a.compile_vae:
            vae.decode = torch.compile(vae.decode, mode=a.compile, fullgraph=True)
    out["fullgraph"] = a.compile != "none"

    # Conditioning as StableDiffusionXLPipeline.encode_prompt leaves it.
    g = torch.Generator("cpu").manual_seed(a.seed)
    ids = torch.randint(0, 49408, (1, 77), generator=g).to(dev)

    def encode():
        if te is None:
            return None
        h1 = te[0](ids, output_hidden_states=True).hidden_states[-2]
        o2 = te[1](ids, output_hidden_states=True)
        return torch.cat([h1, o2.hidden_states[-2]], dim=-1), o2.text_embeds

    reset_peak(dev)
    if te is not None:
        with torch.no_grad():
            encode()
            enc = [timed(dev, encode) for _ in range(3)]
        (pos, pooled), out["encode_ms"] = enc[-1][0], [ms for _, ms in enc]
    else:
        pos = torch.randn(1, 77, ucfg["cross_attention_dim"], generator=g).to(dev, dtype)
        pooled = torch.randn(1, ucfg["projection_class_embeddings_input_dim"] - 6 * ucfg["addition_time_embed_dim"],
                             generator=g).to(dev, dtype)
        out["encode_ms"] = None
    out["peak_encode_bytes"] = peak(dev)
    prompt_embeds = torch.cat([torch.zeros_like(pos), pos])  # [negative, positive]
    add_text_embeds = torch.cat([torch.zeros_like(pooled), pooled])
    s = float(a.size)
    add_time_ids = torch.tensor([[s, s, 0.0, 0.0, s, s]], dtype=dtype).repeat(2, 1).to(dev)
    added = {"text_embeds": add_text_embeds, "time_ids": add_time_ids}
    scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER)
    lat = a.size // 8
    noise = torch.randn(1, 4, lat, lat, generator=g).to(dev, dtype)

    def loop(steps, events=None, host=None):
        scheduler.set_timesteps(a.steps, device=dev)
        scheduler.set_begin_index(0)
        latents = noise * scheduler.init_noise_sigma
        for i, t in enumerate(scheduler.timesteps[:steps]):
            if events is not None:
                events[i].record()
            if host is not None:
                host.append(time.perf_counter())
            x = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            pred = unet(x, t, encoder_hidden_states=prompt_embeds, timestep_cond=None, cross_attention_kwargs=None,
                        added_cond_kwargs=added, return_dict=False)[0]
            uncond, text = pred.chunk(2)
            latents = scheduler.step(uncond + a.guidance * (text - uncond), t, latents, return_dict=False)[0]
        if events is not None:
            events[steps].record()
        if host is not None:
            host.append(time.perf_counter())
        return latents

    with torch.no_grad():
        try:
            _, first_ms = timed(dev, lambda: loop(1))
        except Exception as e:  # noqa: BLE001 - a graph break under fullgraph: compile with breaks
            if a.compile == "none":
                raise
            out["fullgraph_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            out["fullgraph"] = False
            torch._dynamo.reset()
            unet = torch.compile(eager_unet, mode=a.compile)
            if a.compile_vae:
                vae.decode = torch.compile(eager_decode, mode=a.compile)
            _, first_ms = timed(dev, lambda: loop(1))
        out["compile_s"] = first_ms / 1e3 if a.compile != "none" else None
        _, out["warmup_ms"] = timed(dev, lambda: loop(max(a.warmup_steps, 1)))
        reset_peak(dev)
        runs = []
        for _ in range(a.repeats):
            host = []
            if cuda:
                ev = [torch.cuda.Event(enable_timing=True) for _ in range(a.steps + 1)]
                sync(dev)
                latents = loop(a.steps, ev, host)
                sync(dev)
                step_ms = [ev[i].elapsed_time(ev[i + 1]) for i in range(a.steps)]
            else:
                latents = loop(a.steps, None, host)
                step_ms = [(host[i + 1] - host[i]) * 1e3 for i in range(a.steps)]
            runs.append(dict(step_ms=step_ms, loop_s=sum(step_ms) / 1e3,
                             host_ms=[(host[i + 1] - host[i]) * 1e3 for i in range(a.steps)]))
        out["peak_denoise_bytes"] = peak(dev)
        best = min(runs, key=lambda r: r["loop_s"])
        out.update(step_ms=best["step_ms"], host_step_ms=best["host_ms"], loop_s=best["loop_s"],
                   loop_s_all=[r["loop_s"] for r in runs], step_ms_median=statistics.median(best["step_ms"]))
        z = latents / vae.config.scaling_factor
        reset_peak(dev)
        _, warm_ms = timed(dev, lambda: vae.decode(z, return_dict=False)[0])
        dec = [timed(dev, lambda: vae.decode(z, return_dict=False)[0])[1] for _ in range(a.decode_repeats)]
        if a.profile:
            # The compiled UNet as timed (CUDA-graph replays included: CUPTI records the kernels
            # a graph launches), for a per-kernel comparison with sdxl_bench --profile.
            from torch.profiler import ProfilerActivity, profile
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with profile(activities=acts) as prof:
                loop(2)
                sync(dev)
            prof.export_chrome_trace(a.profile)
            out["profile"] = a.profile
        out.update(vae_decode_warmup_ms=warm_ms, vae_decode_ms=dec, vae_decode_ms_median=statistics.median(dec),
                   peak_decode_bytes=peak(dev))
    if cuda:
        out["max_reserved_bytes"] = torch.cuda.max_memory_reserved(dev)
    try:
        out["unet_tflop_per_step"] = unet_tflop(ucfg, a.size)
    except Exception as e:  # noqa: BLE001 - a cross-check only
        out["unet_tflop_error"] = str(e)
    print(json.dumps({k: v for k, v in out.items() if k not in ("step_ms", "host_step_ms")}, indent=1))
    if a.json_out:
        os.makedirs(os.path.dirname(os.path.abspath(a.json_out)), exist_ok=True)
        with open(a.json_out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
