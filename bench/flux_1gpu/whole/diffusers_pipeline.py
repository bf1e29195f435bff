#!/usr/bin/env python3
"""diffusers FluxPipeline end to end on a pipeline folder (bf16, one device), stage by stage.

  diffusers_pipeline.py DIR --out-png x.png --json-out x.json [--device cuda] [--size 1024] [--steps 28]

Prints one JSON object: load time (from_pretrained + .to(device)), one warm-up generation, then
  * end to end: two full `pipe(prompt)` calls to a PIL image (the faster is quoted),
  * stages, timed separately with a device synchronize after each: text encoding
    (`encode_prompt`: CLIP + T5), the denoising loop (`pipe(prompt_embeds=..., output_type="latent")`),
    VAE decode (unpack, unscale, `vae.decode`, postprocess to PIL),
  * torch.cuda.max_memory_allocated over the whole process and over the timed part.
The image of the end-to-end call (seed from torch.Generator("cpu").manual_seed(seed)) is saved.
"""
import argparse
import json
import time

t_start = time.time()
import torch  # noqa: E402
from diffusers import FluxPipeline  # noqa: E402

PROMPT = "a photo of a red fox sitting in the snow, 35mm"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--out-png", required=True)
    ap.add_argument("--json-out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    r = dict(import_s=round(time.time() - t_start, 2), torch=torch.__version__)
    t = time.perf_counter()
    pipe = FluxPipeline.from_pretrained(a.dir, torch_dtype=torch.bfloat16).to(dev)
    sync()
    r["load_s"] = round(time.perf_counter() - t, 2)
    r["t5_param_dtypes"] = sorted({str(p.dtype) for p in pipe.text_encoder_2.parameters()})
    if cuda:
        r["after_load_alloc_gib"] = torch.cuda.memory_allocated() / 2**30
    pipe.set_progress_bar_config(disable=True)
    kw = dict(height=a.size, width=a.size, num_inference_steps=a.steps, guidance_scale=3.5, max_sequence_length=512)
    gen = lambda: torch.Generator("cpu").manual_seed(a.seed)  # noqa: E731
    t = time.perf_counter()
    pipe(PROMPT, generator=gen(), **kw)
    sync()
    r["warmup_s"] = round(time.perf_counter() - t, 3)
    if cuda:
        r["peak_alloc_load_warmup_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        torch.cuda.reset_peak_memory_stats()
    e2e = []
    for _ in range(2):
        t = time.perf_counter()
        img = pipe(PROMPT, generator=gen(), **kw).images[0]
        sync()
        e2e.append(round((time.perf_counter() - t) * 1e3, 1))
    img.save(a.out_png)
    r["end_to_end_ms"] = e2e
    with torch.no_grad():
        t = time.perf_counter()
        pe, pooled, _ = pipe.encode_prompt(prompt=PROMPT, prompt_2=None, device=dev, max_sequence_length=512)
        sync()
        r["encode_ms"] = round((time.perf_counter() - t) * 1e3, 1)
        t = time.perf_counter()
        lat = pipe(prompt_embeds=pe, pooled_prompt_embeds=pooled, generator=gen(), output_type="latent", **kw).images
        sync()
        r["loop_ms"] = round((time.perf_counter() - t) * 1e3, 1)
        t = time.perf_counter()
        x = pipe._unpack_latents(lat, a.size, a.size, pipe.vae_scale_factor)
        x = x / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        image = pipe.vae.decode(x, return_dict=False)[0]
        pil = pipe.image_processor.postprocess(image, output_type="pil")[0]
        sync()
        r["decode_ms"] = round((time.perf_counter() - t) * 1e3, 1)
    r["staged_sum_ms"] = round(r["encode_ms"] + r["loop_ms"] + r["decode_ms"], 1)
    import numpy as np
    r["staged_image_equals_e2e"] = bool(np.array_equal(np.asarray(pil), np.asarray(img)))
    if cuda:
        r["peak_alloc_timed_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        r["peak_alloc_whole_gib"] = max(r["peak_alloc_timed_gib"], r["peak_alloc_load_warmup_gib"])
    r["total_process_s"] = round(time.time() - t_start, 1)
    print(json.dumps(r))
    json.dump(r, open(a.json_out, "w"), indent=1)


if __name__ == "__main__":
    main()
