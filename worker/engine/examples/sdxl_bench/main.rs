//! SDXL base on one GPU: the pipeline's stages with random weights of the real shapes.
//!
//! Builds [`SdxlPipeline::random_base`] (UNet 2.57 B, CLIP ViT-L + OpenCLIP bigG, VAE decoder; bf16
//! on `cuda:0`) with the fast paths of `--variant` ([`Perf::parse`]: `reference`, `all`,
//! `all,-graphs`, `cl,graphs`, `all,attn=cudnn`, ...), then times what a request runs, the way
//! the engine runs it (`models::denoise_request`, the pipeline's decode):
//!
//! * prompt encode (both text encoders on 77 tokens; no negative prompt, so SDXL's zeros);
//! * the 30-step Euler loop at 1024² with CFG (a UNet batch of 2): per-step times from the loop's
//!   own step events (it synchronizes each step), the loop's total, the faster of `--repeats`;
//! * the decode (VAE in bf16 + RGB8 to the host) and the VAE alone (synchronized);
//! * peak allocated memory per stage (`aten::memory_peak`), resident memory after the build;
//! * MFU: the UNet step's FLOPs counted from the shapes ([`unet_tflop`]; diffusers' FLOP counter
//!   gives the same 13.52 TFLOP at 1024², batch 2) against a bf16 8192³ matmul timed here.
//!
//! A warm-up request of `--warmup-steps` steps at the same size comes first (cuDNN/cuBLAS
//! plans, the CUDA graph's capture). One JSON object goes to stdout (and `--json-out`).
//!
//! `--check` instead checks the fast paths' numerics on this device and exits: the fused
//! GroupNorm and GEGLU kernels and each attention kernel on SDXL's shapes against fp32 (with the
//! attention kernels' times), the UNet forward of every formulation against the fp32 UNet on the
//! same weights (1-D parameters perturbed so the norms' affine terms count), a graph replay
//! against the eager forward, and the VAE decode likewise. `--profile TRACE.json` records two
//! denoiser steps with kineto after the timing (`bench/flux_1gpu/profile_summary.py` sums it).
//!
//! ```text
//! sdxl_bench [--variant all] [--size 1024] [--steps 30] [--warmup-steps 3] [--repeats 2]
//!            [--decode-repeats 3] [--device cuda:0|cpu] [--seed 0] [--cudnn-benchmark]
//!            [--json-out PATH] [--profile TRACE.json] [--check] [--tiny --cpu]
//! ```
//! `--tiny --cpu`: the tiny random pipeline in fp32 on the CPU (a dry run of every code path).
//! `--flops-only`: prints the UNet step's TFLOP at `--size` (CFG batch of 2) and exits.

use std::path::{Path, PathBuf};
use std::time::Instant;

mod check;

use anyhow::{Context, Result, bail};
use ditfleet_engine::aten;
use ditfleet_engine::models::sdxl::fast::Perf;
use ditfleet_engine::models::sdxl::unet::Config;
use ditfleet_engine::models::sdxl::{PipelineOptions, SdxlPipeline};
use ditfleet_engine::models::{self, DiffusionModel};
use ditfleet_engine::{Control, GenerateRequest};
use serde_json::{Value, json};
use tch::{Device, Kind, Tensor};

struct Args {
    variant: Perf,
    variant_spec: String,
    size: u32,
    steps: u32,
    warmup_steps: u32,
    repeats: usize,
    decode_repeats: usize,
    device: Device,
    tiny: bool,
    seed: u64,
    cudnn_benchmark: bool,
    json_out: Option<PathBuf>,
    profile: Option<PathBuf>,
    check: bool,
}

fn parse() -> Result<Args> {
    let mut a = Args {
        variant: Perf::ALL,
        variant_spec: "all".into(),
        size: 1024,
        steps: 30,
        warmup_steps: 3,
        repeats: 2,
        decode_repeats: 3,
        device: Device::Cuda(0),
        tiny: false,
        seed: 0,
        cudnn_benchmark: false,
        json_out: None,
        profile: None,
        check: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--variant" => {
                a.variant_spec = val()?;
                a.variant = Perf::parse(&a.variant_spec).map_err(anyhow::Error::msg)?;
            }
            "--size" => a.size = val()?.parse()?,
            "--steps" => a.steps = val()?.parse()?,
            "--warmup-steps" => a.warmup_steps = val()?.parse()?,
            "--repeats" => a.repeats = val()?.parse::<usize>()?.max(1),
            "--decode-repeats" => a.decode_repeats = val()?.parse::<usize>()?.max(1),
            "--seed" => a.seed = val()?.parse()?,
            "--cudnn-benchmark" => a.cudnn_benchmark = true,
            "--json-out" => a.json_out = Some(val()?.into()),
            "--profile" => a.profile = Some(val()?.into()),
            "--check" => a.check = true,
            "--flops-only" => {}
            "--tiny" => a.tiny = true,
            "--cpu" => a.device = Device::Cpu,
            "--device" => {
                a.device = match val()?.as_str() {
                    "cpu" => Device::Cpu,
                    "cuda" => Device::Cuda(0),
                    s => Device::Cuda(s.strip_prefix("cuda:").context("--device cpu|cuda:N")?.parse()?),
                }
            }
            "-h" | "--help" => {
                println!("see the doc comment of worker/engine/examples/sdxl_bench.rs");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    if a.tiny && a.size == 1024 {
        a.size = 64;
    }
    if !a.size.is_multiple_of(8) {
        bail!("--size must be a multiple of 8");
    }
    Ok(a)
}

fn sync(d: Device) {
    if let Device::Cuda(i) = d {
        tch::Cuda::synchronize(i as i64);
    }
}

fn ordinal(d: Device) -> Option<usize> {
    match d {
        Device::Cuda(i) => Some(i),
        _ => None,
    }
}

/// Current allocated bytes (the peak right after a reset), resetting the peak.
fn allocated_now(d: Device) -> Option<u64> {
    let i = ordinal(d)?;
    aten::memory_peak(i, true).ok()?;
    aten::memory_peak(i, true).ok()
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// FLOPs (2 per multiply-add) of one UNet forward on a batch of `b` latents `h x w` with `seq`
/// text tokens: every convolution, linear layer and attention product, as diffusers' FLOP counter
/// counts them (norms and elementwise work excluded).
fn unet_tflop(c: &Config, b: i64, h: i64, w: i64, seq: i64) -> f64 {
    let (b, seq) = (b as f64, seq as f64);
    let temb = c.time_embedding_dim as f64;
    let conv = |cin: i64, cout: i64, k: f64, hw: (i64, i64)| {
        2.0 * b * (cin * cout) as f64 * k * k * (hw.0 * hw.1) as f64
    };
    let lin = |m: f64, k: i64, n: i64| 2.0 * m * (k * n) as f64;
    let res = |cin: i64, cout: i64, hw: (i64, i64)| {
        let short = if cin != cout {
            conv(cin, cout, 1.0, hw)
        } else {
            0.0
        };
        conv(cin, cout, 3.0, hw) + conv(cout, cout, 3.0, hw) + short + lin(b, c.time_embedding_dim, cout)
    };
    let cross = c.cross_attention_dim;
    let transformer = |ch: i64, layers: i64, hw: (i64, i64)| {
        let n = (hw.0 * hw.1) as f64;
        let tok = b * n;
        let block = 4.0 * lin(tok, ch, ch) + 4.0 * b * n * n * ch as f64 // self-attention
            + 2.0 * lin(tok, ch, ch) + 2.0 * lin(b * seq, cross, ch) + 4.0 * b * n * seq * ch as f64
            + lin(tok, ch, 8 * ch) + lin(tok, 4 * ch, ch); // GEGLU feed-forward
        2.0 * lin(tok, ch, ch) + layers as f64 * block
    };
    let boc = &c.block_out_channels;
    let n = boc.len();
    let mut sizes = vec![(h, w)];
    for _ in 1..n {
        let (ph, pw) = sizes[sizes.len() - 1];
        sizes.push(((ph + 1) / 2, (pw + 1) / 2));
    }
    let first = c.block_out_channels[0];
    let mut f = lin(b, first, c.time_embedding_dim) + lin(b, c.time_embedding_dim, c.time_embedding_dim);
    f += lin(b, c.projection_class_embeddings_input_dim, c.time_embedding_dim)
        + lin(b, temb as i64, temb as i64);
    f += conv(c.in_channels, first, 3.0, sizes[0]) + conv(first, c.out_channels, 3.0, sizes[0]);
    for (i, &ch) in boc.iter().enumerate() {
        for j in 0..c.layers_per_block {
            let cin = if j == 0 { boc[i.saturating_sub(1)] } else { ch };
            f += res(cin, ch, sizes[i]);
            if c.down_attention[i] {
                f += transformer(ch, c.transformer_layers_per_block[i], sizes[i]);
            }
        }
        if i + 1 < n {
            f += conv(ch, ch, 3.0, sizes[i + 1]);
        }
    }
    let top = boc[n - 1];
    f += 2.0 * res(top, top, sizes[n - 1])
        + transformer(top, c.transformer_layers_per_block[n - 1], sizes[n - 1]);
    let mut prev = top;
    for i in 0..n {
        let level = n - 1 - i;
        let (ch, below) = (boc[level], boc[level.saturating_sub(1)]);
        for j in 0..=c.layers_per_block {
            let skip = if j == c.layers_per_block { below } else { ch };
            let cin = if j == 0 { prev } else { ch };
            f += res(cin + skip, ch, sizes[level]);
            if c.up_attention[i] {
                f += transformer(ch, c.transformer_layers_per_block[level], sizes[level]);
            }
        }
        if i + 1 < n {
            f += conv(ch, ch, 3.0, sizes[level - 1]);
        }
        prev = ch;
    }
    f / 1e12
}

/// The bf16 matmul rate of this device (8192³, median of 3 timings of 10), TFLOP/s.
fn matmul_tflops(d: Device) -> Result<Option<f64>> {
    if !d.is_cuda() {
        return Ok(None);
    }
    let a = Tensor::f_randn([8192, 8192], (Kind::BFloat16, d))?;
    let b = Tensor::f_randn([8192, 8192], (Kind::BFloat16, d))?;
    for _ in 0..3 {
        let _ = a.f_matmul(&b)?;
    }
    let mut rates = Vec::new();
    for _ in 0..3 {
        sync(d);
        let t = Instant::now();
        for _ in 0..10 {
            let _ = a.f_matmul(&b)?;
        }
        sync(d);
        rates.push(10.0 * 2.0 * 8192f64.powi(3) / t.elapsed().as_secs_f64() / 1e12);
    }
    Ok(Some(median(&rates)))
}

fn request(size: u32, steps: u32, seed: u64) -> GenerateRequest {
    GenerateRequest {
        model: "sdxl-base".into(),
        prompt: "a photo of a red fox sitting in the snow, 35mm".into(),
        negative_prompt: None,
        width: size,
        height: size,
        steps,
        guidance: 5.0,
        true_cfg_scale: 1.0,
        seed,
        plan: None,
        scheduler: None,
        loras: Vec::new(),
    }
}

fn build(args: &Args, perf: Perf) -> Result<SdxlPipeline> {
    if args.tiny {
        let mut p = SdxlPipeline::tiny_random(args.seed)?;
        p.set_perf(perf)?;
        return Ok(p);
    }
    let kind = if args.device.is_cuda() {
        Kind::BFloat16
    } else {
        Kind::Float
    };
    let options = PipelineOptions {
        perf,
        ..PipelineOptions::new(args.device, kind)
    };
    Ok(SdxlPipeline::random_base(options, args.seed)?)
}

fn param_count(vs: &tch::nn::VarStore) -> i64 {
    vs.variables().values().map(|t| t.numel() as i64).sum()
}

/// One variant's timings (see the module docs).
fn time_variant(args: &Args) -> Result<Value> {
    let dev = args.device;
    let t0 = Instant::now();
    let p = build(args, args.variant)?;
    sync(dev);
    let build_s = t0.elapsed().as_secs_f64();
    let resident = allocated_now(dev);
    let text_params = param_count(&p.text.text_encoder.vs) + param_count(&p.text.text_encoder_2.vs);
    let elem = if p.options().text_encoder_kind == Kind::Float {
        4
    } else {
        2
    };
    let matmul = matmul_tflops(dev)?;
    let _ = allocated_now(dev);

    let t1 = Instant::now();
    let warm = request(args.size, args.warmup_steps.max(1), args.seed);
    models::generate(&p, &warm, None, 0, &mut |_| {}, &mut |_| Control::Continue)?;
    sync(dev);
    let warmup_s = t1.elapsed().as_secs_f64();

    let req = request(args.size, args.steps, args.seed);
    let mut runs = Vec::new();
    for _ in 0..args.repeats {
        let mut at = Vec::new();
        let d = models::denoise_request(&p, &req, None, 0, &mut |_| {}, &mut |ev| {
            at.push(ev.elapsed.as_secs_f64() * 1e3);
            Control::Continue
        })?;
        let steps: Vec<f64> = at
            .iter()
            .scan(0.0, |prev, &t| Some(t - std::mem::replace(prev, t)))
            .collect();
        runs.push((d, steps));
    }
    let best = (0..runs.len())
        .min_by(|&a, &b| {
            runs[a]
                .0
                .timings
                .denoise_ms
                .total_cmp(&runs[b].0.timings.denoise_ms)
        })
        .context("no timed run")?;
    let latents = runs[best].0.latents.shallow_clone();

    let ord = ordinal(dev);
    let peak = |reset: bool| ord.and_then(|i| aten::memory_peak(i, reset).ok());
    peak(true);
    let mut decode_ms = Vec::new();
    let mut rgb = Vec::new();
    for _ in 0..args.decode_repeats {
        let t = Instant::now();
        rgb = p.decode(&latents, &req)?;
        decode_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let decode_peak = peak(true);
    let mut vae_ms = Vec::new();
    for _ in 0..args.decode_repeats {
        sync(dev);
        let t = Instant::now();
        let img = p.vae.decode_fast(&latents, &p.options().perf)?;
        sync(dev);
        vae_ms.push(t.elapsed().as_secs_f64() * 1e3);
        drop(img);
    }
    let (lh, lw) = p.latent_size(&req);
    let rows = 2; // classifier-free guidance: [negative, positive]
    let tflop = unet_tflop(&p.unet.config, rows, lh, lw, 77);
    let steps = &runs[best].1;
    let step_median = median(steps);
    let (captures, replays) = p.graph_counts();
    let mean = rgb.iter().map(|&v| f64::from(v)).sum::<f64>() / rgb.len().max(1) as f64;
    if let Some(path) = &args.profile {
        profile(&p, &req, path)?;
    }
    let t = |d: &models::Denoised| d.timings.clone();
    Ok(json!({
        "bench": "sdxl_bench",
        "model": if args.tiny { "sdxl tiny random" } else { "sdxl-base shapes, random weights" },
        "variant": args.variant.name(),
        "variant_spec": args.variant_spec,
        "cudnn_benchmark": args.cudnn_benchmark,
        "device": format!("{dev:?}"),
        "dtype": format!("{:?}", p.options().kind),
        "vae_dtype": format!("{:?}", p.vae.kind()),
        "size": args.size,
        "steps": args.steps,
        "cfg_batch": rows,
        "params": {
            "unet": p.unet.num_parameters(),
            "text_encoders": text_params,
            "vae_decoder": param_count(&p.vae.decoder.vs),
        },
        "build_s": build_s,
        "warmup_s": warmup_s,
        "matmul_bf16_tflops": matmul,
        "unet_tflop_per_step": tflop,
        "encode_ms": runs.iter().map(|r| t(&r.0).encode_ms).collect::<Vec<_>>(),
        "step_ms": steps,
        "step_ms_median": step_median,
        "loop_s": runs[best].0.timings.denoise_ms / 1e3,
        "loop_s_all": runs.iter().map(|r| t(&r.0).denoise_ms / 1e3).collect::<Vec<_>>(),
        "mfu": matmul.map(|m| tflop / (step_median / 1e3) / m),
        "decode_ms": decode_ms,
        "decode_ms_median": median(&decode_ms),
        "vae_decode_ms": vae_ms,
        "vae_decode_ms_median": median(&vae_ms),
        "peak_bytes": {
            "resident_after_build": resident,
            "encode": t(&runs[best].0).peak_memory_encode_bytes,
            "denoise": t(&runs[best].0).peak_memory_denoise_bytes,
            "decode": decode_peak,
        },
        "text_encoder_bytes": text_params * elem,
        "graph_captures": captures,
        "graph_replays": replays,
        "image_mean": mean,
    }))
}

/// Two denoiser steps (the UNet on the CFG batch and the guidance) under kineto.
fn profile(p: &SdxlPipeline, req: &GenerateRequest, path: &Path) -> Result<()> {
    let cond = p.encode(req)?;
    let sched = p.scheduler(req)?;
    let mut den = p.denoiser(req, &cond, sched.as_ref())?;
    let x = p.noise(req)?;
    let ts = sched.timesteps();
    sync(p.compute_device());
    aten::profiler_start()?;
    for (i, &t) in ts.iter().take(2).enumerate() {
        let _ = den.predict(&x, i, t)?;
    }
    sync(p.compute_device());
    aten::profiler_stop(path)?;
    Ok(())
}

fn main() -> Result<()> {
    let args = parse()?;
    let _guard = tch::no_grad_guard();
    if args.cudnn_benchmark {
        tch::Cuda::cudnn_set_benchmark(true);
    }
    if std::env::args().any(|a| a == "--flops-only") {
        let c = if args.tiny {
            Config::tiny()
        } else {
            Config::sdxl_base()
        };
        let l = i64::from(args.size) / 8;
        println!(
            "{}",
            json!({"size": args.size, "unet_tflop_per_step": unet_tflop(&c, 2, l, l, 77)})
        );
        return Ok(());
    }
    let report = if args.check {
        let kernels = check::kernels(args.device, args.tiny)?;
        json!({"bench": "sdxl_bench --check", "device": format!("{:?}", args.device), "size": args.size,
               "kernels": kernels, "models": check::models(&args)?})
    } else {
        time_variant(&args)?
    };
    let text = serde_json::to_string_pretty(&report)?;
    println!("{text}");
    if let Some(path) = &args.json_out {
        std::fs::write(path, &text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
