//! Flux.1-dev transformer denoising benchmark.
//!
//! Builds the FULL-SIZE Flux.1-dev transformer (19 double + 38 single blocks, 3072 wide) with
//! random weights (or loads original-layout weights with `--weights`), then runs the denoising
//! loop the pipeline runs: 1024x1024 (4096 packed image tokens), 512 T5 tokens, bf16, 28 Euler
//! steps with guidance, after warm-up. Prints one JSON object.
//!
//! The loop is run twice: once with a device synchronize after every step (per-step times), once
//! with no host sync at all inside the loop (the loop time to quote). tch exposes no CUDA events,
//! so per-step times come from the synchronized run.
//!
//! ```text
//! cargo run --release -p ditfleet-engine --example flux_bench                 # CUDA, full size
//! cargo run --release -p ditfleet-engine --example flux_bench -- --tiny       # CPU smoke test
//!   [--steps N] [--warmup N] [--size PX] [--txt-tokens N] [--device cpu|cuda:N] [--fp32|--bf16]
//!   [--fp8] (the blocks quantised to FP8 after the build: `Flux::quantize_fp8`)
//!   [--save-fp8 ditfleet-fp8.safetensors] (with --fp8: writes the pre-quantised checkpoint,
//!   which `--weights` then loads; the JSON's `build_peak_allocated_bytes` is the build's peak)
//!   [--weights flux1-dev.safetensors] [--dump-latent out.safetensors] [--seed N]
//!   [--depth N] [--single-depth N]
//! ```
//! `--check-fused` (CUDA): one double and one single block at full width, bf16, with every set
//! of formulations, each against the same blocks in fp32 (relative L2), then exits: the fused
//! kernels are checked before any timing trusts them. `--profile TRACE.json` records two timed
//! steps with libtorch's kineto profiler after the loops (Chrome trace; summarise with
//! `bench/flux_1gpu/profile_summary.py`).
//!
//! `--graphs` runs each step's forward as a replayed CUDA graph (captured at the first step, as
//! the multi-GPU ranks do; `parallel::graphs`).
//!
//! The forward takes each step's row of the modulation table (`Flux::modulation_table`), as the
//! pipeline does; `--per-step-modulation` passes the conditioning vectors instead (every block
//! computes its modulation each step: the engine before the table).
//!
//! `--sim-plan ulysses=4` (or `ring=R`, `ulysses=U,ring=R`, `text=replicated`) runs ONE rank's
//! share of that plan: rank 0's slice of the text and image tokens through the same
//! `UspAttention` the multi-GPU ranks run, with [`LoopbackComm`] peers (collectives return
//! copies of this rank's own data, nothing crosses an interconnect). Its step time is the floor
//! under the plan's step on that many GPUs: compute and local copies, no communication and no
//! waiting for peers. Its latents are not the plan's image.
//!
//! `--dump-latent` writes the inputs (packed noise, txt, pooled, guidance), the first step's
//! transformer output (`v0`) and the final packed latents, so diffusers can be run on the same
//! inputs for comparison. `--depth` / `--single-depth` override the number of double / single
//! blocks (full width, fewer blocks: cheap correctness checks). `DITFLEET_FLUX_OPT` selects the
//! transformer's fused formulations (see `transformer::Opts`); the report names the ones used.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use ditfleet_engine::flux::sampling::{self, SchedulerConfig};
use ditfleet_engine::flux::transformer::{Config, Flux, Opts};
use ditfleet_engine::parallel::{LoopbackComm, Plan, SeqLayout, UspAttention};
use tch::{Device, Kind, Tensor};

struct Args {
    tiny: bool,
    steps: usize,
    warmup: usize,
    size: i64,
    txt_tokens: i64,
    device: Device,
    kind: Kind,
    weights: Option<PathBuf>,
    dump: Option<PathBuf>,
    seed: u64,
    depth: Option<i64>,
    single_depth: Option<i64>,
    check_fused: bool,
    profile: Option<PathBuf>,
    graphs: bool,
    sim_plan: Option<Plan>,
    per_step_mod: bool,
    fp8: bool,
    save_fp8: Option<std::path::PathBuf>,
}

fn parse() -> Result<Args> {
    let mut a = Args {
        tiny: false,
        steps: 28,
        warmup: 2,
        size: 1024,
        txt_tokens: 512,
        device: Device::cuda_if_available(),
        kind: Kind::BFloat16,
        weights: None,
        dump: None,
        seed: 0,
        depth: None,
        single_depth: None,
        check_fused: false,
        profile: None,
        graphs: false,
        sim_plan: None,
        per_step_mod: false,
        fp8: false,
        save_fp8: None,
    };
    let mut bf16 = false;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--tiny" => a.tiny = true,
            "--fp32" => a.kind = Kind::Float,
            "--bf16" => bf16 = true,
            "--steps" => a.steps = val()?.parse()?,
            "--warmup" => a.warmup = val()?.parse()?,
            "--size" => a.size = val()?.parse()?,
            "--txt-tokens" => a.txt_tokens = val()?.parse()?,
            "--seed" => a.seed = val()?.parse()?,
            "--weights" => a.weights = Some(val()?.into()),
            "--dump-latent" => a.dump = Some(val()?.into()),
            "--depth" => a.depth = Some(val()?.parse()?),
            "--single-depth" => a.single_depth = Some(val()?.parse()?),
            "--check-fused" => a.check_fused = true,
            "--graphs" => a.graphs = true,
            "--per-step-modulation" => a.per_step_mod = true,
            "--fp8" => a.fp8 = true,
            "--save-fp8" => a.save_fp8 = Some(val()?.into()),
            "--sim-plan" => {
                let p: Plan = val()?.parse().map_err(anyhow::Error::msg)?;
                if p.pipefusion > 1 || p.cfg > 1 || p.dp > 1 {
                    bail!("--sim-plan takes ulysses/ring/text only (one rank's sequence-parallel share)");
                }
                a.sim_plan = Some(p);
            }
            "--profile" => a.profile = Some(val()?.into()),
            "--device" => {
                let v = val()?;
                a.device = match v.as_str() {
                    "cpu" => Device::Cpu,
                    "cuda" => Device::Cuda(0),
                    s => match s.strip_prefix("cuda:") {
                        Some(i) => Device::Cuda(i.parse()?),
                        None => bail!("unknown device {s}"),
                    },
                };
            }
            "-h" | "--help" => {
                println!("see the doc comment of worker/engine/examples/flux_bench.rs");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    if a.tiny {
        a.device = Device::Cpu;
        a.kind = Kind::Float;
        a.size = a.size.min(256);
        a.txt_tokens = a.txt_tokens.min(64);
    }
    if bf16 {
        a.kind = Kind::BFloat16;
    }
    if a.size % 16 != 0 {
        bail!("--size must be a multiple of 16");
    }
    Ok(a)
}

fn sync(d: Device) {
    if let Device::Cuda(i) = d {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Highest device memory use NVML reports across the samples taken (whole device, all
/// processes); None without NVML.
struct MemProbe {
    nvml: Option<nvml_wrapper::Nvml>,
    index: u32,
    peak: Option<u64>,
}

impl MemProbe {
    fn new(d: Device) -> Self {
        let index = match d {
            Device::Cuda(i) => i as u32,
            _ => 0,
        };
        let nvml = if matches!(d, Device::Cuda(_)) {
            nvml_wrapper::Nvml::init().ok()
        } else {
            None
        };
        Self {
            nvml,
            index,
            peak: None,
        }
    }

    fn sample(&mut self) {
        let used = self
            .nvml
            .as_ref()
            .and_then(|n| n.device_by_index(self.index).and_then(|d| d.memory_info()).ok())
            .map(|m| m.used);
        if let Some(used) = used {
            self.peak = Some(self.peak.map_or(used, |p| p.max(used)));
        }
    }
}

fn rel_l2(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.f_to_kind(Kind::Float)?;
    let b = b.f_to_kind(Kind::Float)?;
    Ok(f64::try_from(a.f_sub(&b)?.f_norm()?)? / f64::try_from(b.f_norm()?)?)
}

/// `--check-fused`: every set of formulations on one double + one single block (full width, bf16)
/// against the same blocks in fp32 with the reference formulation.
fn check_fused(dev: Device, seed: u64) -> Result<serde_json::Value> {
    use ditfleet_engine::flux::transformer::{Ctx, LocalAttention};
    let mut cfg = Config::dev();
    // Two of each: the whole-model check below crosses every kind of block boundary.
    cfg.depth = 2;
    cfg.depth_single_blocks = 2;
    tch::manual_seed(seed as i64);
    let m16 = Flux::new(&cfg, dev, Kind::BFloat16)?;
    // Norm scales start at 1: perturb every 1-D parameter so the scales are exercised too.
    for (name, t) in m16.vs.variables() {
        if t.dim() == 1 && (name.ends_with("scale") || name.contains("norm")) {
            let mut t = t;
            let noise = Tensor::f_randn_like(&t)?.f_mul_scalar(0.3)?.f_add_scalar(1.0)?;
            t.f_copy_(&noise)?;
        }
    }
    let mut m32 = Flux::new(&cfg, dev, Kind::Float)?;
    m32.vs.copy(&m16.vs)?;
    let (txt_len, lh, lw) = (512i64, 128i64, 128i64);
    let img_len = (lh / 2) * (lw / 2);
    let h = cfg.hidden_size;
    let ids = Flux::position_ids(txt_len, lh, lw, dev)?;
    let pe = m16.rope(&ids)?;
    let img = Tensor::f_randn([1, img_len, h], (Kind::BFloat16, dev))?;
    let txt = Tensor::f_randn([1, txt_len, h], (Kind::BFloat16, dev))?;
    let x = Tensor::f_cat(&[&txt, &img], 1)?;
    let vec = Tensor::f_randn([1, h], (Kind::BFloat16, dev))?;
    let f32 = |t: &Tensor| t.f_to_kind(Kind::Float);
    let ctx = |opts| Ctx {
        pe: &pe,
        attn: &LocalAttention,
        opts,
    };
    let (ri, rt) = m32.double_blocks[0].forward(&f32(&img)?, &f32(&txt)?, &f32(&vec)?, ctx(Opts::NONE))?;
    let rs = m32.single_blocks[0].forward(&f32(&x)?, &f32(&vec)?, ctx(Opts::NONE))?;
    let mut out = serde_json::Map::new();
    let variants = [
        ("none", Opts::NONE),
        ("rope,rms,mod,cat", Opts::parse("rope,rms,mod,cat")),
        ("all", Opts::ALL),
        ("all,-qkv", Opts::parse("all,-qkv")),
        ("all,-ln", Opts::parse("all,-ln")),
        ("all,-gelu", Opts::parse("all,-gelu")),
        ("all,-split", Opts::parse("all,-split")),
        ("all,-gelu,-split", Opts::parse("all,-gelu,-split")),
    ];
    for (name, opts) in variants {
        let (i, t) = m16.double_blocks[0].forward(&img, &txt, &vec, ctx(opts))?;
        let s = m16.single_blocks[0].forward(&x, &vec, ctx(opts))?;
        out.insert(
            name.to_string(),
            serde_json::json!({
                "double_img_rel_l2_vs_fp32": rel_l2(&i, &ri)?,
                "double_txt_rel_l2_vs_fp32": rel_l2(&t, &rt)?,
                "single_rel_l2_vs_fp32": rel_l2(&s, &rs)?,
            }),
        );
    }
    // The whole model (2 double + 2 single blocks, img_in to final layer): each block's closing
    // residual carried into the next block's first kernel (`chain`) or added where it closes.
    let img_raw = Tensor::f_randn([1, img_len, cfg.in_channels], (Kind::BFloat16, dev))?;
    let model_ref = m32.forward_opts(
        &f32(&img_raw)?,
        &f32(&txt)?,
        &f32(&vec)?,
        &pe,
        &LocalAttention,
        Opts::NONE,
    )?;
    for name in ["all", "all,-chain", "all,-chain,-ln"] {
        let got = m16.forward_opts(&img_raw, &txt, &vec, &pe, &LocalAttention, Opts::parse(name))?;
        out.insert(
            format!("model {name}"),
            serde_json::json!({ "model_rel_l2_vs_fp32": rel_l2(&got, &model_ref)? }),
        );
    }
    // Ring attention's fused log-sum-exp merge against the reference ops (ring=4's block shape at
    // 1024²: 24 heads, 1152 queries).
    let (acc, acc_lse) = (
        Tensor::f_randn([1, 24, 1152, 128], (Kind::Float, dev))?,
        Tensor::f_randn([1, 24, 1152], (Kind::Float, dev))?.f_mul_scalar(3.0)?,
    );
    let o_new = Tensor::f_randn([1, 1152, 24, 128], (Kind::BFloat16, dev))?.f_transpose(1, 2)?; // cuDNN's layout
    let lse_new = Tensor::f_randn([1, 24, 1152], (Kind::Float, dev))?.f_mul_scalar(3.0)?;
    let (want_o, want_l) = ditfleet_engine::parallel::attention::merge(&acc, &acc_lse, &o_new, &lse_new)?;
    let (got_o, got_l) = (acc.f_detach_copy()?, acc_lse.f_detach_copy()?);
    ditfleet_engine::aten::lse_merge(&got_o, &got_l, &o_new, &lse_new, &got_o)?;
    // The first merge (a bf16 accumulator, the first block's output) into a bf16 result (the
    // last merge of two blocks): against the reference on the same bf16 inputs.
    let acc_b = acc.f_to_kind(Kind::BFloat16)?;
    let (want_b, _) = ditfleet_engine::parallel::attention::merge(
        &acc_b.f_to_kind(Kind::Float)?,
        &acc_lse,
        &o_new,
        &lse_new,
    )?;
    let (got_b, got_bl) = (o_new.f_empty_like()?, acc_lse.f_detach_copy()?);
    ditfleet_engine::aten::lse_merge(&acc_b, &got_bl, &o_new, &lse_new, &got_b)?;
    out.insert(
        "ring_lse_merge".into(),
        serde_json::json!({
            "fused_rel_l2_vs_reference_o": rel_l2(&got_o, &want_o)?,
            "fused_rel_l2_vs_reference_lse": rel_l2(&got_l, &want_l)?,
            "bf16_in_bf16_out_rel_l2_vs_reference_o": rel_l2(&got_b, &want_b)?,
            "bf16_in_bf16_out_rel_l2_vs_reference_lse": rel_l2(&got_bl, &want_l)?,
        }),
    );
    // tch 0.24's own binding of _addmm_activation (use_gelu = true) against RELU and GELU of the
    // same product: it passes use_gelu as `beta`, so the RELU epilogue runs.
    let a = Tensor::f_randn([4096, 3072], (Kind::BFloat16, dev))?;
    let w = Tensor::f_randn([3072, 3072], (Kind::BFloat16, dev))?.f_mul_scalar(0.02)?;
    let bias = Tensor::f_randn([3072], (Kind::BFloat16, dev))?.f_mul_scalar(0.1)?;
    let lin = a.f_linear(&w, Some(&bias))?;
    let tch_op = bias.f_internal_addmm_activation(&a, &w.f_transpose(0, 1)?, true)?;
    let shim_op = ditfleet_engine::aten::addmm_gelu(&bias, &a, &w.f_transpose(0, 1)?)?;
    let gelu = lin.f_gelu("tanh")?;
    out.insert(
        "addmm_activation_use_gelu".into(),
        serde_json::json!({
            "tch_binding_rel_l2_vs_relu": rel_l2(&tch_op, &lin.f_relu()?)?,
            "tch_binding_rel_l2_vs_gelu_tanh": rel_l2(&tch_op, &gelu)?,
            "shim_rel_l2_vs_gelu_tanh": rel_l2(&shim_op, &gelu)?,
            "shim_rel_l2_vs_relu": rel_l2(&shim_op, &lin.f_relu()?)?,
        }),
    );
    Ok(serde_json::Value::Object(out))
}

fn main() -> Result<()> {
    let args = parse()?;
    let _guard = tch::no_grad_guard();
    let dev = args.device;
    if args.check_fused {
        let report = check_fused(dev, args.seed)?;
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let mut cfg = if args.tiny { Config::tiny() } else { Config::dev() };
    if let Some(d) = args.depth {
        cfg.depth = d;
    }
    if let Some(d) = args.single_depth {
        cfg.depth_single_blocks = d;
    }
    let mut mem = MemProbe::new(dev);
    if let Device::Cuda(i) = dev {
        ditfleet_engine::aten::memory_peak(i, true)?;
    }
    let t_build = Instant::now();
    let mut model = match &args.weights {
        Some(w) => Flux::load(&cfg, w, dev, args.kind)?,
        None => {
            tch::manual_seed(args.seed as i64);
            Flux::new(&cfg, dev, args.kind)?
        }
    };
    let params: i64 = model.vs.variables().values().map(|t| t.numel() as i64).sum();
    if args.fp8 {
        model.quantize_fp8()?;
        ditfleet_engine::aten::empty_cache()?;
    }
    let model = model;
    sync(dev);
    let build_s = t_build.elapsed().as_secs_f64();
    // The most libtorch held while the model was built, loaded or quantised.
    let build_peak = match dev {
        Device::Cuda(i) => Some(ditfleet_engine::aten::memory_peak(i, false)?),
        _ => None,
    };
    if let Some(path) = &args.save_fp8 {
        if !model.is_fp8() {
            bail!("--save-fp8 needs --fp8 (or FP8 --weights)");
        }
        model.save_fp8(path)?;
    }
    // Bytes of the weights as held (FP8 blocks: 1 byte a value plus their scales).
    let weight_bytes = model.weight_bytes() as i64;
    mem.sample();

    // Inputs: seeded noise as the pipeline draws it, random text states.
    let (lh, lw) = sampling::latent_size(args.size as u32, args.size as u32, 8);
    let noise = sampling::noise(args.seed, cfg.in_channels / 4, lh, lw, args.kind, dev)?;
    let x0 = sampling::pack(&noise)?; // (1, 4096, 64) at 1024px
    let img_seq = x0.size()[1];
    tch::manual_seed(args.seed as i64 + 1);
    let txt_raw = Tensor::f_randn([1, args.txt_tokens, cfg.context_in_dim], (args.kind, Device::Cpu))?
        .f_to_device(dev)?;
    let pooled = Tensor::f_randn([1, cfg.vec_in_dim], (args.kind, Device::Cpu))?.f_to_device(dev)?;
    let guidance_scale = 3.5f64;
    let sched = sampling::schedule(&SchedulerConfig::dev(), args.steps, img_seq);

    // Everything that does not change across steps, computed once.
    let ids = Flux::position_ids(args.txt_tokens, lh, lw, dev)?;
    // --sim-plan: rank 0's slices, as `flux::parallel::runner` cuts them.
    let sp = args.sim_plan.map_or(1, |p| p.ulysses * p.ring);
    let layout = SeqLayout::new(sp, args.txt_tokens, img_seq, args.sim_plan.and_then(|p| p.text));
    let ((ts, tl), (is, il)) = (layout.txt[0], layout.img[0]);
    let x0 = x0.f_narrow(1, is, il)?;
    let ids = Tensor::f_cat(
        &[
            ids.f_narrow(0, ts, tl)?,
            ids.f_narrow(0, args.txt_tokens + is, il)?,
        ],
        0,
    )?;
    let pe = model.rope(&ids)?;
    let txt = model.embed_txt(&txt_raw.f_narrow(1, ts, tl)?)?;
    let (uly, ring) = match args.sim_plan {
        Some(p) => (LoopbackComm::new(p.ulysses, dev), LoopbackComm::new(p.ring, dev)),
        None => (LoopbackComm::new(1, dev), LoopbackComm::new(1, dev)),
    };
    let usp = UspAttention {
        ulysses: &uly,
        ring: &ring,
        layout: &layout,
    };
    let fwd = |x: &Tensor, txt: &Tensor, vec: &Tensor, pe: &ditfleet_engine::flux::transformer::Rope| {
        if args.sim_plan.is_some() {
            model.forward_with(x, txt, vec, pe, &usp)
        } else {
            model.forward_prepared(x, txt, vec, pe)
        }
    };
    let steps = args.steps as i64;
    let t = Tensor::f_from_slice(&sched.timesteps)?
        .f_to_device(dev)?
        .f_to_kind(args.kind)?
        .f_div_scalar(1000.0)?;
    let g = Tensor::f_full([steps], guidance_scale, (Kind::Float, dev))?;
    let vecs = model.vec(&t, &pooled.f_expand([steps, cfg.vec_in_dim], false)?, Some(&g))?; // (steps, h)
    // As the pipeline feeds the forward: rows of the modulation table (`--per-step-modulation`:
    // the conditioning vectors, every block computing its modulation each step).
    let mods = if args.per_step_mod {
        vecs
    } else {
        model.modulation_table(&vecs)? // (steps, W)
    };
    let vec_rows: Vec<Tensor> = (0..steps)
        .map(|i| mods.f_narrow(0, i, 1))
        .collect::<Result<_, _>>()?;

    // With --graphs, every forward (warm-up included) goes through one captured graph.
    let cache = std::cell::RefCell::new(ditfleet_engine::parallel::graphs::GraphCache::default());
    let key = ditfleet_engine::parallel::graphs::StepKey(vec![ts, tl, is, il, args.txt_tokens, lh, lw]);
    let graphed = |t: &[Tensor]| fwd(&t[0], &t[1], &t[2], &pe);
    let forward = |x: &Tensor, vec: &Tensor| -> Result<Tensor> {
        match (args.graphs, dev) {
            (true, Device::Cuda(ordinal)) => Ok(cache.borrow_mut().step(
                ordinal,
                &key,
                &[x, &txt, vec],
                &[&pe.cos, &pe.sin, &pe.freqs],
                &graphed,
            )?),
            _ => Ok(fwd(x, &txt, vec, &pe)?),
        }
    };
    let run = |per_step: Option<&mut Vec<f64>>| -> Result<Tensor> {
        let mut x = x0.shallow_clone();
        let mut per_step = per_step;
        for (i, vec) in vec_rows.iter().enumerate() {
            let s = Instant::now();
            let v = forward(&x, vec)?;
            x = sampling::euler_step(&x, &v, sched.sigmas[i], sched.sigmas[i + 1])?;
            if let Some(ps) = per_step.as_deref_mut() {
                sync(dev);
                ps.push(s.elapsed().as_secs_f64() * 1e3);
            }
        }
        Ok(x)
    };

    // Warm-up (kernel selection, allocator growth). The first warm-up forward is step 0's.
    let mut v0 = None;
    for vec in vec_rows.iter().take(args.warmup.max(1)) {
        let v = forward(&x0, vec)?;
        if v0.is_none() {
            v0 = Some(v.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?);
        }
    }
    sync(dev);
    mem.sample();

    let mut per_step = Vec::with_capacity(args.steps);
    let s = Instant::now();
    let synced_latents = run(Some(&mut per_step))?;
    let synced_s = s.elapsed().as_secs_f64();
    mem.sample();

    sync(dev);
    let s = Instant::now();
    let latents = run(None)?;
    let host_enqueue_s = s.elapsed().as_secs_f64();
    sync(dev);
    let loop_s = s.elapsed().as_secs_f64();
    mem.sample();

    if let Some(path) = &args.profile {
        ditfleet_engine::aten::profiler_start()?;
        let mut x = x0.shallow_clone();
        for (i, vec) in vec_rows.iter().enumerate().take(2) {
            let v = forward(&x, vec)?;
            x = sampling::euler_step(&x, &v, sched.sigmas[i], sched.sigmas[i + 1])?;
        }
        sync(dev);
        ditfleet_engine::aten::profiler_stop(path)?;
    }
    let finite = bool::try_from(latents.f_isfinite()?.f_all()?)?;
    // Both runs do the same work; they must agree exactly (determinism check, after the timing).
    let deterministic = bool::try_from(synced_latents.f_eq_tensor(&latents)?.f_all()?)?;
    if let Some(path) = &args.dump {
        let named = [
            (
                "noise_packed",
                x0.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?,
            ),
            ("txt", txt_raw.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?),
            ("pooled", pooled.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?),
            ("guidance", Tensor::from_slice(&[guidance_scale as f32])),
            ("sigmas", Tensor::from_slice(&sched.sigmas)),
            ("v0", v0.as_ref().context("no warm-up forward")?.shallow_clone()),
            (
                "latents",
                latents.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?,
            ),
        ];
        Tensor::write_safetensors(&named, path)?;
    }
    let mean = per_step.iter().sum::<f64>() / per_step.len().max(1) as f64;
    let mut sorted = per_step.clone();
    sorted.sort_by(f64::total_cmp);
    let median = if sorted.is_empty() {
        f64::NAN
    } else if sorted.len() % 2 == 1 {
        sorted[sorted.len() / 2]
    } else {
        (sorted[sorted.len() / 2 - 1] + sorted[sorted.len() / 2]) / 2.0
    };
    let report = serde_json::json!({
        "model": if args.tiny { "flux-tiny-random" } else { "flux-dev (full size)" },
        "weights": args.weights.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "random".into()),
        "device": format!("{dev:?}"),
        "dtype": format!("{:?}", args.kind),
        "params": params,
        "precision": if model.is_fp8() { "fp8" } else { "bf16" },
        // Whether the FP8 precision's attention ran in FP8 (cuDNN): after the run, so a device
        // that refused it reads false.
        "fp8_attention": model.is_fp8() && ditfleet_engine::nn::fp8_attention::usable(dev),
        "fp8_attention_calls": ditfleet_engine::nn::fp8_attention::calls(),
        "fp8_attention_plans": ditfleet_engine::aten::sdpa_fp8_report(),
        "weight_gib": weight_bytes as f64 / (1u64 << 30) as f64,
        "image_px": args.size,
        "img_tokens": img_seq,
        "txt_tokens": args.txt_tokens,
        "steps": args.steps,
        "warmup_steps": args.warmup.min(args.steps),
        "build_s": build_s,
        "build_peak_allocated_bytes": build_peak,
        "per_step_ms": per_step,
        "mean_step_ms": mean,
        "median_step_ms": median,
        "opts": format!("{:?}", Opts::get()),
        "cuda_graphs": args.graphs,
        "sim_plan": args.sim_plan.map(|p| p.to_string()),
        "modulation": if args.per_step_mod { "per step" } else { "table" },
        "sim_rank0_tokens": args.sim_plan.map(|_| serde_json::json!({"txt": tl, "img": il})),
        "depth": cfg.depth,
        "single_depth": cfg.depth_single_blocks,
        "host_enqueue_s_unsynced_loop": host_enqueue_s,
        "loop_s_synced_each_step": synced_s,
        "loop_s": loop_s,
        "peak_device_memory_bytes_nvml": mem.peak,
        "latents_finite": finite,
        "runs_identical": deterministic,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    if !finite {
        bail!("latents contain NaN/Inf");
    }
    Ok(())
}
