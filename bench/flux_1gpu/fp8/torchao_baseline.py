#!/usr/bin/env python3
"""Peer baseline: diffusers FluxTransformer2DModel + torchao FP8 (dynamic activation + weight) +
torch.compile, one Hopper GPU. The recipe follows huggingface/flux-fast (utils/pipeline_utils.py)
and diffusers' torchao docs:

  transformer.fuse_qkv_projections()                        (flux-fast; --no-fuse-qkv to skip)
  quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
  inductor flags: torchao's recommended_inductor_config_setter (what quantize_ sets by default:
      coordinate_descent_tuning, coordinate_descent_check_all_directions, ...) + flux-fast's
      conv_1x1_as_mm=True, epilogue_fusion=False                        (--inductor-flags default: none)
  torch.compile(transformer, mode="max-autotune", fullgraph=True)      (flux-fast's use_compile)

flux-fast's attention is FlashAttention-3 in FP8 (flash_attn_interface, not on PyPI); here attention
is diffusers' default dispatch (SDPA), as in the diffusers/xDiT baselines (--attn-backend to change).

Loop, inputs, warm-up and CUDA-event timing are those of the shared flux_diffusers_baseline.py
(flux_bench_common.py, imported from --common-dir): FluxPipeline's 28-step flow-match Euler loop,
batch 1, 512 text tokens, guidance 3.5 (one forward per step), RANDOM weights with Flux.1-dev's
shapes (seed 0, same weights as the other baselines), `--warmup` one-step warm-up loops (the first
one compiles; its wall time is compile_s), then `--repeats` timed loops; the best is reported.

  python3 bench/flux_1gpu/fp8/torchao_baseline.py --size 1024 --json-out $OUT/logs/torchao_fp8_1024.json
  python3 bench/flux_1gpu/fp8/torchao_baseline.py --no-quant ...                 # bf16, same compile
  python3 bench/flux_1gpu/fp8/torchao_baseline.py --cpu-smoke --common-dir /work/shared/bench
The FP8 path needs CUDA capability >= 8.9 (torchao asserts it); it cannot run on CPU.
Compilation (max-autotune, whole transformer) takes minutes and has no internal time limit: the
caller wraps the process in `timeout` (bench/flux_1gpu/fp8/peers.sh).
"""

import argparse
import importlib.metadata
import os
import sys
import time

import torch

QUANT_DESC = {
    "row": "torchao float8 dynamic act + weight, per-row",
    "tensor": "torchao float8 dynamic act + weight, per-tensor",
}


def _version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _import_common(common_dir):
    d = os.path.abspath(common_dir)
    if not os.path.exists(os.path.join(d, "flux_bench_common.py")):
        sys.exit(f"flux_bench_common.py not found in --common-dir {d} (copy /work/shared/bench there)")
    sys.path.insert(0, d)
    import flux_bench_common as C  # noqa: E402

    return C


def _set_inductor_flags():
    """torchao's recommended_inductor_config_setter (quantize_ applies it by default for FP8) plus the
    two flags flux-fast's optimize() adds. Set explicitly so that --no-quant compiles the same way."""
    from torchao.quantization.utils import recommended_inductor_config_setter

    recommended_inductor_config_setter()
    cfg = torch._inductor.config
    cfg.conv_1x1_as_mm = True
    cfg.epilogue_fusion = False
    return dict(coordinate_descent_tuning=cfg.coordinate_descent_tuning,
                coordinate_descent_check_all_directions=cfg.coordinate_descent_check_all_directions,
                conv_1x1_as_mm=cfg.conv_1x1_as_mm, epilogue_fusion=cfg.epilogue_fusion,
                fx_graph_cache=cfg.fx_graph_cache, float32_matmul_precision=torch.get_float32_matmul_precision())


def _fuse_qkv(model):
    """diffusers' fuse_qkv_projections (as flux-fast), then drop the unfused q/k/v Linears, which the
    fused forward no longer uses (diffusers keeps them; dropping them keeps weights/peak memory honest)."""
    model.fuse_qkv_projections()
    dropped = 0
    for m in model.modules():
        if getattr(m, "fused_projections", False):
            for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
                if isinstance(getattr(m, name, None), torch.nn.Module):
                    delattr(m, name)
                    dropped += 1
    return dropped


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--common-dir", default=".gpu/bench", help="folder holding the shared flux_bench_common.py")
    p.add_argument("--size", type=int, choices=[1024, 2048], default=1024, help="image height = width")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--warmup", type=int, default=2, help="one-step warm-up loops (the first compiles)")
    p.add_argument("--repeats", type=int, default=2, help="timed loops (as the diffusers baseline)")
    p.add_argument("--txt-len", type=int, default=512)
    p.add_argument("--guidance", type=float, default=3.5)
    p.add_argument("--granularity", choices=["row", "tensor"], default="row", help="PerRow (flux-fast) or PerTensor")
    p.add_argument("--no-quant", action="store_true", help="bf16 weights and activations, same compile")
    p.add_argument("--compile-mode", default=None,
                   choices=["max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead", "default", "none"],
                   help="torch.compile mode for the whole transformer, fullgraph=True (flux-fast: max-autotune); "
                        "none = eager (default with --cpu-smoke)")
    p.add_argument("--inductor-flags", choices=["flux-fast", "default"], default="flux-fast",
                   help="flux-fast: torchao's recommended inductor config + conv_1x1_as_mm, no epilogue fusion; "
                        "default: leave inductor's defaults (and quantize_ with set_inductor_config=False)")
    p.add_argument("--no-fuse-qkv", action="store_true", help="keep separate q/k/v projections")
    p.add_argument("--attn-backend", default="",
                   help="diffusers attention backend (e.g. _native_cudnn, _native_flash); empty: diffusers' default")
    p.add_argument("--device", default="cuda")
    p.add_argument("--json-out", default="")
    p.add_argument("--dump-out", default="", help="torch.save the transformer output of step 0 (after timing)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny config, 256x256, 32 text tokens, 2 steps, 1 warm-up, CPU, no quant, no compile")
    p.add_argument("--cpu-fp8", action="store_true",
                   help="with --cpu-smoke: per-tensor FP8 on CPU with torchao's hardware check bypassed "
                        "(checks the quantize_ code path only; per-row FP8 matmul does not exist on CPU)")
    a = p.parse_args()

    C = _import_common(a.common_dir)
    import diffusers
    from diffusers import FluxTransformer2DModel

    height = width = a.size
    if a.cpu_smoke:
        a.device, a.steps, a.warmup, height, width, a.txt_len = "cpu", 2, 1, 256, 256, 32
        a.no_quant = not a.cpu_fp8
        if a.cpu_fp8:
            a.granularity = "tensor"
        a.compile_mode = a.compile_mode or "none"
    a.compile_mode = a.compile_mode or "max-autotune"
    quant = not a.no_quant
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    cfg = C.TINY_CONFIG if a.cpu_smoke else C.FLUX_DEV_CONFIG
    if a.cpu_fp8:  # no 128x128 weights: torchao would take its (triton-only) 128x128-blockwise path
        cfg = dict(cfg, attention_head_dim=40, axes_dims_rope=(8, 16, 16))
    dtype = torch.bfloat16
    if quant and cuda and torch.cuda.get_device_capability(dev) < (8, 9):
        sys.exit("FP8 needs CUDA capability >= 8.9 (Ada/Hopper); use --no-quant")

    t0 = time.perf_counter()
    model = C.build_transformer(FluxTransformer2DModel, cfg, dev, dtype)
    if cuda:
        torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    if a.attn_backend:
        model.set_attention_backend(a.attn_backend)
    attn_proc = type(model.transformer_blocks[0].attn.processor).__name__
    dropped = 0 if a.no_fuse_qkv else _fuse_qkv(model)

    inductor_flags = _set_inductor_flags() if a.inductor_flags == "flux-fast" and a.compile_mode != "none" else {}

    quant_s = 0.0
    if quant:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_

        if a.cpu_fp8:
            import torchao.quantization.quant_api as qa

            qa._check_hardware_support = lambda *_a, **_k: None
        gran = PerRow() if a.granularity == "row" else PerTensor()
        t0 = time.perf_counter()
        quantize_(model, Float8DynamicActivationFloat8WeightConfig(
            granularity=gran, set_inductor_config=a.inductor_flags == "flux-fast"))
        if cuda:
            torch.cuda.synchronize()
        quant_s = time.perf_counter() - t0
    weights_gib = C.gib(torch.cuda.memory_allocated()) if cuda else 0.0
    n_fp8 = sum(1 for m in model.modules() if isinstance(m, torch.nn.Linear) and "Float8" in type(m.weight).__name__)
    n_lin = sum(1 for m in model.modules() if isinstance(m, torch.nn.Linear))
    print(f"built FluxTransformer2DModel: {n_params/1e9:.3f} B params in {build_s:.1f} s, processor {attn_proc}, "
          f"fused qkv: {not a.no_fuse_qkv} (dropped {dropped} unfused Linears), "
          f"quant: {QUANT_DESC[a.granularity] if quant else 'none (bf16)'} ({n_fp8}/{n_lin} Linears FP8, "
          f"{quant_s:.1f} s), weights {weights_gib:.2f} GiB", flush=True)

    if a.compile_mode != "none":
        model = torch.compile(model, mode=a.compile_mode, fullgraph=True)

    inputs = C.make_inputs(cfg, height, width, a.txt_len, dev, dtype)
    sched = C.make_scheduler()
    n_img = inputs["latents"].shape[1]

    from torch._dynamo.utils import counters

    with torch.inference_mode():
        # warm-up exactly as flux_diffusers_baseline.py (the first one-step loop compiles)
        warm = []
        for _ in range(a.warmup):
            t1 = time.perf_counter()
            C.denoise(model, sched, inputs, a.steps, a.guidance, max_steps=1)
            if cuda:
                torch.cuda.synchronize()
            warm.append(time.perf_counter() - t1)
        print("warm-up step wall seconds: " + ", ".join(f"{w:.2f}" for w in warm), flush=True)
        compile_info = None
        if a.compile_mode != "none":
            compile_info = dict(
                what="torch.compile(transformer, fullgraph=True) whole FluxTransformer2DModel",
                mode=a.compile_mode,
                inductor_flags=inductor_flags or "inductor defaults",
                compile_s=warm[0] if warm else None,
                unique_graphs=int(counters["stats"].get("unique_graphs", 0)),
                graph_breaks=int(sum(counters["graph_break"].values())),
                cudagraph_skips=int(counters["inductor"].get("cudagraph_skips", 0)),
            )
            print("compile: " + ", ".join(f"{k}={v}" for k, v in compile_info.items()), flush=True)

        def step0_output():
            # the loop's first transformer call (same arguments as flux_bench_common.denoise step 0)
            lat = inputs["latents"].clone()
            ts = C.set_timesteps(sched, a.steps, lat.shape[1], dev)
            g = torch.full([1], a.guidance, device=dev, dtype=torch.float32).expand(lat.shape[0])
            out = model(hidden_states=lat, timestep=ts[0].expand(lat.shape[0]).to(lat.dtype) / 1000, guidance=g,
                        pooled_projections=inputs["pooled"], encoder_hidden_states=inputs["prompt_embeds"],
                        txt_ids=inputs["txt_ids"], img_ids=inputs["img_ids"], joint_attention_kwargs=None,
                        return_dict=False)[0]
            return out.clone().cpu(), float(ts[0])

        meta = dict(quant=QUANT_DESC[a.granularity] if quant else "none (bf16)", compile=a.compile_mode,
                    fuse_qkv=not a.no_fuse_qkv, height=height, width=width, txt_len=a.txt_len, steps=a.steps,
                    weights_seed=0, inputs_seed=1234, torch=str(torch.__version__), torchao=_version("torchao"),
                    diffusers=diffusers.__version__)

        if not cuda:  # CPU smoke test: run the loop (and the dump) and stop
            out = C.denoise(model, sched, inputs, a.steps, a.guidance)
            if a.dump_out:
                o, t = step0_output()
                os.makedirs(os.path.dirname(os.path.abspath(a.dump_out)), exist_ok=True)
                torch.save(dict(out=o, timestep=t, meta=meta), a.dump_out)
            print(f"CPU smoke OK: quant={meta['quant']} compile={a.compile_mode} out {tuple(out.shape)} "
                  f"finite={bool(torch.isfinite(out).all())} std={float(out.float().std()):.4f}"
                  + (f" compile_info={compile_info}" if compile_info else ""), flush=True)
            return

        torch.cuda.reset_peak_memory_stats()
        runs = []
        for r in range(a.repeats):
            out, total_ms, per_step, wall_ms = C.timed_denoise(model, sched, inputs, a.steps, a.guidance)
            s = C.summarize(per_step)
            runs.append(dict(total_s=total_ms / 1e3, wall_s=wall_ms / 1e3, **s))
            print(f"run {r}: {a.steps} steps {total_ms/1e3:.3f} s (wall {wall_ms/1e3:.3f} s), "
                  f"step median {s['step_ms_median']:.1f} ms, min {s['step_ms_min']:.1f}, max {s['step_ms_max']:.1f}",
                  flush=True)
        peak_alloc = C.gib(torch.cuda.max_memory_allocated())
        peak_reserved = C.gib(torch.cuda.max_memory_reserved())
        finite = bool(torch.isfinite(out).all())
        out_std = float(out.float().std())
        if compile_info is not None:  # recompiles during the timed loops would show here
            compile_info["unique_graphs_after_timing"] = int(counters["stats"].get("unique_graphs", 0))
            compile_info["cudagraph_skips_after_timing"] = int(counters["inductor"].get("cudagraph_skips", 0))
        dump_info = None
        if a.dump_out:
            o, t = step0_output()
            os.makedirs(os.path.dirname(os.path.abspath(a.dump_out)), exist_ok=True)
            torch.save(dict(out=o, timestep=t, meta=meta), a.dump_out)
            dump_info = dict(path=a.dump_out, shape=list(o.shape), timestep=t, std=float(o.float().std()))

    best = min(runs, key=lambda r: r["total_s"])
    tflop = C.flux_step_tflop(cfg, n_img, a.txt_len)
    res = dict(
        engine="diffusers+torchao" if quant else "diffusers",
        quant=meta["quant"],
        compile=compile_info,
        compile_s=compile_info["compile_s"] if compile_info else None,
        gpus=1,
        device_name=torch.cuda.get_device_name(),
        torch=torch.__version__,
        torchao=_version("torchao"),
        diffusers=diffusers.__version__,
        attn_processor=attn_proc,
        attn_backend=a.attn_backend or "diffusers default",
        fuse_qkv=not a.no_fuse_qkv,
        fp8_linears=n_fp8,
        linears=n_lin,
        params_b=n_params / 1e9,
        steps=a.steps,
        height=height,
        width=width,
        txt_len=a.txt_len,
        img_tokens=n_img,
        build_s=build_s,
        quant_s=quant_s,
        warmup_step_wall_s=warm,
        runs=runs,
        total_s=best["total_s"],
        step_ms_median=best["step_ms_median"],
        step_ms_mean=best["step_ms_mean"],
        weights_gib=weights_gib,
        peak_alloc_gib=peak_alloc,
        peak_reserved_gib=peak_reserved,
        model_tflop_per_step=tflop,
        achieved_tflops=tflop / (best["step_ms_median"] / 1e3),
        output_finite=finite,
        output_std=out_std,
        dump=dump_info,
    )
    print("RESULT " + " ".join(f"{k}={v}" for k, v in res.items() if k not in ("runs",)), flush=True)
    C.write_json(a.json_out, res)


if __name__ == "__main__":
    main()
