//! How far Flux's FP8 path is from bf16 and fp32 at full size (issue 20's numerics), on random
//! weights with Flux.1-dev's shapes, optionally with outlier channels injected (random weights
//! understate the outliers trained weights have).
//!
//! One bf16 model is built from `--seed`; an fp32 copy of it is the reference. Reported (relative
//! L2 unless named): one forward (step 0's input) of bf16 and FP8 against fp32 and FP8 against
//! bf16; the 28-step final latents of bf16 and FP8 against fp32 (with `--loop-fp32`) and FP8
//! against bf16; the decoded images' PSNR (FP8 against bf16, bf16 against fp32 where run) through
//! a random-weight VAE decoder. `--outliers`: before anything runs, 8 of every 1024 input columns
//! of every block projection are scaled by 16 (weight outliers) and the modulations' scale rows
//! get +16 on 8 of every 1024 channels (activation outliers after the modulated LayerNorms).
//!
//! `--also modulation,final,embedders` (or `--also all`): after the blocks' FP8 run, those layer
//! groups are quantised too, cumulatively in that order, each stage measured against bf16 like
//! the blocks: what keeping them bf16 saves in error, and what it costs in bytes. `modulation`:
//! every block's modulation and the final layer's adaLN projection (the modulation table's
//! layers); `final`: the final projection to patches; `embedders`: `img_in`, `txt_in`,
//! `vector_in`, `guidance_in` and `time_in`'s second layer (its first stays: `Flux::kind` reads
//! its dtype).
//!
//! ```text
//! fp8_numerics [--size 1024] [--steps 28] [--seed 0] [--outliers] [--loop-fp32] [--json-out F]
//!   [--also modulation,final,embedders|all]
//! fp8_numerics --tiny          # CPU smoke run (tiny config, the FP8 arithmetic emulated)
//! fp8_numerics --cpu-dev --depth 1 --single-depth 2 --size 256 --also all
//!                              # CPU: Flux.1-dev's widths, fewer blocks, fp32 as the "bf16" run
//! ```
//! Needs about 72 GB of GPU memory at full size (the bf16 model and its fp32 copy at once).

use anyhow::{Context, Result, bail};
use ditfleet_engine::flux::sampling::{self, SchedulerConfig};
use ditfleet_engine::flux::transformer::{Config, Flux};
use ditfleet_engine::flux::vae;
use ditfleet_engine::nn::Linear;
use ditfleet_engine::nn::fp8::Fp8Linear;
use serde_json::json;
use tch::{Device, Kind, Tensor};

struct Args {
    tiny: bool,
    size: i64,
    steps: usize,
    seed: u64,
    outliers: bool,
    loop_fp32: bool,
    json_out: Option<String>,
    also: Vec<String>,
    cpu_dev: bool,
    depth: Option<i64>,
    single_depth: Option<i64>,
}

/// The layer groups `--also` can quantise, in the order they are added.
const GROUPS: [&str; 3] = ["modulation", "final", "embedders"];

fn parse() -> Result<Args> {
    let mut a = Args {
        tiny: false,
        size: 1024,
        steps: 28,
        seed: 0,
        outliers: false,
        loop_fp32: false,
        json_out: None,
        also: Vec::new(),
        cpu_dev: false,
        depth: None,
        single_depth: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--tiny" => a.tiny = true,
            "--size" => a.size = val()?.parse()?,
            "--steps" => a.steps = val()?.parse()?,
            "--seed" => a.seed = val()?.parse()?,
            "--outliers" => a.outliers = true,
            "--loop-fp32" => a.loop_fp32 = true,
            "--json-out" => a.json_out = Some(val()?),
            "--cpu-dev" => a.cpu_dev = true,
            "--depth" => a.depth = Some(val()?.parse()?),
            "--single-depth" => a.single_depth = Some(val()?.parse()?),
            "--also" => {
                let v = val()?;
                let want: Vec<&str> = if v == "all" {
                    GROUPS.to_vec()
                } else {
                    v.split(',').collect()
                };
                if let Some(bad) = want.iter().find(|g| !GROUPS.contains(g)) {
                    bail!(
                        "--also: unknown group {bad:?} (groups: {}, or all)",
                        GROUPS.join(", ")
                    );
                }
                // Always cumulative in GROUPS order.
                a.also = GROUPS
                    .iter()
                    .filter(|g| want.contains(g))
                    .map(|g| g.to_string())
                    .collect();
            }
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(a)
}

fn rel_l2(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (a, b) = (a.f_to_kind(Kind::Double)?, b.f_to_kind(Kind::Double)?);
    Ok(f64::try_from(a.f_sub(&b)?.f_norm()?)? / f64::try_from(b.f_norm()?)?)
}

/// PSNR of image `a` against `b`, both in [-1, 1] (peak-to-peak 2).
fn psnr(a: &Tensor, b: &Tensor) -> Result<f64> {
    let mse = f64::try_from(
        a.f_to_kind(Kind::Double)?
            .f_clamp(-1.0, 1.0)?
            .f_sub(&b.f_to_kind(Kind::Double)?.f_clamp(-1.0, 1.0)?)?
            .f_square()?
            .f_mean(None::<Kind>)?,
    )?;
    Ok(10.0 * (4.0 / mse.max(1e-30)).log10())
}

/// The modulations' and projections' outliers described in the module docs.
fn inject_outliers(m: &Flux) -> Result<()> {
    let _g = tch::no_grad_guard();
    let h = m.config.hidden_size;
    // 1 on every 128th of `n` channels (8 of every 1024), 0 elsewhere.
    let outlier_mask = |n: i64, like: &Tensor| -> Result<Tensor> {
        Ok(Tensor::f_arange(n, (Kind::Int64, like.device()))?
            .f_remainder(128)?
            .f_eq(0)?
            .f_to_kind(like.kind())?)
    };
    for (_, l) in m.block_linears() {
        // (1 + 15 mask): 16x on the outlier input columns.
        let f = outlier_mask(l.weight.size()[1], &l.weight)?
            .f_mul_scalar(15.0)?
            .f_add_scalar(1.0)?;
        let _ = l.weight.shallow_clone().f_mul_(&f)?;
    }
    // +16 on the outlier channels of the modulations' scale chunks: (shift, scale, gate) x 2 in a
    // double block (chunks 1 and 4), once in a single block (chunk 1).
    let scale_rows = |b: &Tensor, chunks: &[i64]| -> Result<()> {
        for &c in chunks {
            let _ = b
                .f_narrow(0, c * h, h)?
                .f_add_(&outlier_mask(h, b)?.f_mul_scalar(16.0)?)?;
        }
        Ok(())
    };
    for b in &m.double_blocks {
        for md in [&b.img_mod, &b.txt_mod] {
            if let Some(bias) = &md.lin.bias {
                scale_rows(bias, &[1, 4])?;
            }
        }
    }
    for b in &m.single_blocks {
        if let Some(bias) = &b.modulation.lin.bias {
            scale_rows(bias, &[1])?;
        }
    }
    Ok(())
}

/// The `--also` group `group`'s layers of `m` (see the module docs).
fn group_linears<'a>(m: &'a mut Flux, group: &str) -> Vec<&'a mut Linear> {
    let mut v: Vec<&mut Linear> = Vec::new();
    match group {
        "modulation" => {
            for b in &mut m.double_blocks {
                v.push(&mut b.img_mod.lin);
                v.push(&mut b.txt_mod.lin);
            }
            for b in &mut m.single_blocks {
                v.push(&mut b.modulation.lin);
            }
            v.extend(m.final_layer.as_mut().map(|f| &mut f.ada_ln_modulation));
        }
        "final" => v.extend(m.final_layer.as_mut().map(|f| &mut f.linear)),
        "embedders" => {
            v.extend(m.img_in.as_mut());
            v.extend(m.txt_in.as_mut());
            v.push(&mut m.vector_in.in_layer);
            v.push(&mut m.vector_in.out_layer);
            if let Some(g) = m.guidance_in.as_mut() {
                v.push(&mut g.in_layer);
                v.push(&mut g.out_layer);
            }
            v.push(&mut m.time_in.out_layer);
        }
        _ => unreachable!("checked in parse"),
    }
    v
}

/// Quantises `group`'s layers of `m` to FP8; returns how many weights (values) moved.
fn quantize_group(m: &mut Flux, group: &str) -> Result<i64> {
    let mut n = 0;
    for l in group_linears(m, group) {
        n += l.weight.numel() as i64;
        let f = Fp8Linear::quantize(&l.weight, l.bias.as_ref())?;
        l.set_fp8(f);
    }
    Ok(n)
}

struct Inputs {
    x0: Tensor,
    txt: Tensor,
    ids: Tensor,
    pooled: Tensor,
    sched: sampling::Schedule,
    lh: i64,
    lw: i64,
}

/// Step 0's velocity and the final latents of a `steps`-step Euler loop, as fp32 on the CPU.
fn run(m: &Flux, inp: &Inputs, kind: Kind, loop_too: bool) -> Result<(Tensor, Option<Tensor>)> {
    let dev = m.vs.device();
    let c = &m.config;
    let pe = m.rope(&inp.ids.f_to_device(dev)?)?;
    let txt = m.embed_txt(&inp.txt.f_to_device(dev)?.f_to_kind(kind)?)?;
    let steps = inp.sched.timesteps.len() as i64;
    let t = Tensor::f_from_slice(&inp.sched.timesteps)?
        .f_to_device(dev)?
        .f_to_kind(kind)?
        .f_div_scalar(1000.0)?;
    let g = Tensor::f_full([steps], 3.5, (Kind::Float, dev))?;
    let pooled = inp.pooled.f_to_device(dev)?.f_to_kind(kind)?;
    let vecs = m.vec(&t, &pooled.f_expand([steps, c.vec_in_dim], false)?, Some(&g))?;
    let mods = m.modulation_table(&vecs)?;
    let x0 = inp.x0.f_to_device(dev)?.f_to_kind(kind)?;
    let v0 = m.forward_prepared(&x0, &txt, &mods.f_narrow(0, 0, 1)?, &pe)?;
    let v0 = v0.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?;
    if !loop_too {
        return Ok((v0, None));
    }
    let mut x = x0;
    for i in 0..steps {
        let v = m.forward_prepared(&x, &txt, &mods.f_narrow(0, i, 1)?, &pe)?;
        x = sampling::euler_step(
            &x,
            &v,
            inp.sched.sigmas[i as usize],
            inp.sched.sigmas[i as usize + 1],
        )?;
    }
    Ok((v0, Some(x.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?)))
}

fn main() -> Result<()> {
    let a = parse()?;
    let _g = tch::no_grad_guard();
    let (dev, mut cfg, size, txt_len) = if a.cpu_dev {
        (Device::Cpu, Config::dev(), a.size, 512)
    } else if a.tiny || !tch::Cuda::is_available() {
        (Device::Cpu, Config::tiny(), a.size.min(64), 16)
    } else {
        (Device::Cuda(0), Config::dev(), a.size, 512)
    };
    if let Some(d) = a.depth {
        cfg.depth = d;
    }
    if let Some(d) = a.single_depth {
        cfg.depth_single_blocks = d;
    }
    // The fp32 reference runs true fp32 matmuls: libtorch leaves TF32 off for cuBLAS by default.
    let (lh, lw) = sampling::latent_size(size as u32, size as u32, 8);
    let noise = sampling::noise(a.seed, cfg.in_channels / 4, lh, lw, Kind::Float, Device::Cpu)?;
    let x0 = sampling::pack(&noise)?;
    tch::manual_seed(a.seed as i64 + 1);
    let inp = Inputs {
        sched: sampling::schedule(&SchedulerConfig::dev(), a.steps, x0.size()[1]),
        x0,
        txt: Tensor::f_randn([1, txt_len, cfg.context_in_dim], (Kind::Float, Device::Cpu))?,
        pooled: Tensor::f_randn([1, cfg.vec_in_dim], (Kind::Float, Device::Cpu))?,
        ids: Flux::position_ids(txt_len, lh, lw, Device::Cpu)?,
        lh,
        lw,
    };
    let low = if dev.is_cuda() {
        Kind::BFloat16
    } else {
        Kind::Float
    };
    tch::manual_seed(a.seed as i64);
    let mut m = Flux::new(&cfg, dev, low)?;
    if a.outliers {
        inject_outliers(&m)?;
    }
    // The fp32 reference: the same weights, upcast.
    let (v32, lat32) = {
        let mut f = {
            let _z = ditfleet_engine::nn::NoRandomInit::new();
            Flux::new(&cfg, dev, Kind::Float)?
        };
        f.vs.copy(&m.vs)?;
        let r = run(&f, &inp, Kind::Float, a.loop_fp32)?;
        drop(f);
        r
    };
    ditfleet_engine::aten::empty_cache()?;
    let (v16, lat16) = run(&m, &inp, low, true)?;
    m.quantize_fp8()?;
    ditfleet_engine::aten::empty_cache()?;
    let (v8, lat8) = run(&m, &inp, low, true)?;
    // --also: (group, values moved to FP8, step 0's velocity, final latent), cumulative.
    let mut extra = Vec::new();
    for g in &a.also {
        let n = quantize_group(&mut m, g)?;
        let (v, lat) = run(&m, &inp, low, true)?;
        extra.push((g.clone(), n, v, lat.expect("loop")));
    }
    drop(m);
    ditfleet_engine::aten::empty_cache()?;
    let (lat16, lat8) = (lat16.expect("loop"), lat8.expect("loop"));

    // Images through one random-weight VAE decoder (seeded), bf16 on the GPU.
    let vcfg = if dev.is_cuda() || a.cpu_dev {
        vae::Config::dev()
    } else {
        vae::Config::tiny()
    };
    tch::manual_seed(a.seed as i64 + 2);
    let dec = vae::Decoder::new(&vcfg, dev, low)?;
    let image = |lat: &Tensor| -> Result<Tensor> {
        let z = sampling::unpack(&lat.f_to_device(dev)?.f_to_kind(low)?, inp.lh, inp.lw)?;
        Ok(dec.decode(&z)?.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?)
    };
    let (img16, img8) = (image(&lat16)?, image(&lat8)?);
    let mut report = json!({
        "device": format!("{dev:?}"),
        "model": if cfg.hidden_size == Config::dev().hidden_size { "flux-dev shapes, random weights" } else { "flux tiny, random weights" },
        "double_blocks": cfg.depth, "single_blocks": cfg.depth_single_blocks,
        "size": size, "steps": a.steps, "seed": a.seed, "outliers": a.outliers,
        "fp8_attention": ditfleet_engine::nn::fp8_attention::usable(dev),
        "fp8_attention_calls": ditfleet_engine::nn::fp8_attention::calls(),
        "forward_rel_l2": {
            "bf16_vs_fp32": rel_l2(&v16, &v32)?,
            "fp8_vs_fp32": rel_l2(&v8, &v32)?,
            "fp8_vs_bf16": rel_l2(&v8, &v16)?,
        },
        "final_latent_rel_l2": {"fp8_vs_bf16": rel_l2(&lat8, &lat16)?},
        "image_psnr_db": {"fp8_vs_bf16": psnr(&img8, &img16)?},
    });
    if !extra.is_empty() {
        let mut stages = Vec::new();
        let mut added = Vec::new();
        for (g, n, v, lat) in &extra {
            added.push(g.as_str());
            stages.push(json!({
                "fp8_also": added.join("+"),
                "values_moved_to_fp8": n,
                "bytes_saved_vs_bf16": n, // 2 bytes a value become 1 (+ per-channel scales)
                "forward_rel_l2": {"vs_bf16": rel_l2(v, &v16)?, "vs_fp32": rel_l2(v, &v32)?},
                "final_latent_rel_l2_vs_bf16": rel_l2(lat, &lat16)?,
                "image_psnr_db_vs_bf16": psnr(&image(lat)?, &img16)?,
            }));
        }
        report["also"] = json!(stages);
    }
    if let Some(l32) = lat32 {
        report["final_latent_rel_l2"]["bf16_vs_fp32"] = json!(rel_l2(&lat16, &l32)?);
        report["final_latent_rel_l2"]["fp8_vs_fp32"] = json!(rel_l2(&lat8, &l32)?);
        let img32 = image(&l32)?;
        report["image_psnr_db"]["bf16_vs_fp32"] = json!(psnr(&img16, &img32)?);
        report["image_psnr_db"]["fp8_vs_fp32"] = json!(psnr(&img8, &img32)?);
    }
    let text = serde_json::to_string_pretty(&report)?;
    println!("{text}");
    if let Some(p) = a.json_out {
        std::fs::write(p, text)?;
    }
    Ok(())
}
