//! SDXL's multi-GPU plans at full size on ONE GPU: every rank as a thread with the in-process
//! backend (device-to-device copies instead of NCCL), against the one-device pipeline on the same
//! random weights. The ranks share the GPU, so timings mean nothing; the images and latents are
//! the plans' own, which checks the multi-GPU SDXL code path (patch-parallel UNet, CFG branches,
//! banded VAE decode) at SDXL base's real shapes in bf16 where only one GPU is at hand.
//!
//! ```text
//! sdxl_plans [--size 1024] [--steps 6] [--plans 'cfg=2;patch=2;cfg=2,patch=2;patch=4']
//!            [--scheduler euler] [--device 0] [--seed 0]
//! ```
//! One JSON line per plan on stdout: relative L2 of the final latents and PSNR of the image
//! against one device, and the wall time.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ditfleet_engine::models::sdxl::{PipelineOptions, SdxlPipeline};
use ditfleet_engine::parallel::{ParallelPipeline, Plan, ThreadsFactory};
use ditfleet_engine::{Control, Engine, GenerateRequest};
use serde_json::json;
use tch::{Device, Kind, Tensor};

struct Args {
    size: u32,
    steps: u32,
    plans: Vec<Plan>,
    scheduler: String,
    device: usize,
    seed: u64,
}

fn parse() -> Result<Args> {
    let mut a = Args {
        size: 1024,
        steps: 6,
        plans: Vec::new(),
        scheduler: "euler".into(),
        device: 0,
        seed: 0,
    };
    let mut plans = "cfg=2;patch=2;cfg=2,patch=2;patch=4".to_string();
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().with_context(|| format!("{k} needs a value"));
        match k.as_str() {
            "--size" => a.size = v()?.parse()?,
            "--steps" => a.steps = v()?.parse()?,
            "--plans" => plans = v()?,
            "--scheduler" => a.scheduler = v()?,
            "--device" => a.device = v()?.parse()?,
            "--seed" => a.seed = v()?.parse()?,
            other => bail!("unknown argument {other}"),
        }
    }
    a.plans = plans
        .split(';')
        .filter(|p| !p.trim().is_empty())
        .map(|p| p.parse::<Plan>().map_err(anyhow::Error::msg))
        .collect::<Result<_>>()?;
    Ok(a)
}

fn request(a: &Args) -> GenerateRequest {
    GenerateRequest {
        model: "sdxl-base".into(),
        prompt: "a lighthouse on a cliff at dusk".into(),
        negative_prompt: Some("blurry".into()),
        width: a.size,
        height: a.size,
        steps: a.steps,
        guidance: 5.0,
        true_cfg_scale: 1.0,
        plan: None,
        seed: 7,
        scheduler: Some(a.scheduler.clone()),
        loras: Vec::new(),
    }
}

fn psnr(a: &[u8], b: &[u8]) -> f64 {
    let mse = a
        .iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
        .sum::<f64>()
        / a.len().max(1) as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    }
}

fn main() -> Result<()> {
    let a = parse()?;
    let dev = Device::Cuda(a.device);
    let build = || SdxlPipeline::random_base(PipelineOptions::new(dev, Kind::BFloat16), a.seed);
    let req = request(&a);
    let t = Instant::now();
    let mut one = build()?;
    let want = one.generate(&req, &mut |_| Control::Continue)?;
    // The one-device final latents (the parallel engine reports its own as `last_latents`).
    let reference = ditfleet_engine::models::denoise_request(&one, &req, None, 0, &mut |_| {}, &mut |_| {
        Control::Continue
    })?
    .latents
    .to_kind(Kind::Float);
    eprintln!("one device: {:.1} s", t.elapsed().as_secs_f64());
    drop(one);
    for plan in &a.plans {
        let t = Instant::now();
        let mut e = ParallelPipeline::new(
            vec![build()?],
            &vec![dev; plan.world()],
            *plan,
            Box::new(ThreadsFactory {
                device: dev,
                timeout: Duration::from_secs(600),
            }),
        )?;
        let got = e.generate(&req, &mut |_| Control::Continue)?;
        let latents: &Tensor = e.last_latents().first().context("no latents")?;
        let latents = latents.to_kind(Kind::Float).to_device(reference.device());
        let rel = f64::try_from((&latents - &reference).norm())? / f64::try_from(reference.norm())?;
        println!(
            "{}",
            json!({
                "plan": plan.to_string(),
                "size": a.size,
                "steps": a.steps,
                "scheduler": a.scheduler,
                "latents_rel_l2": rel,
                "image_psnr_db": psnr(&want.rgb, &got.rgb),
                "wall_s": t.elapsed().as_secs_f64(),
            })
        );
    }
    Ok(())
}
