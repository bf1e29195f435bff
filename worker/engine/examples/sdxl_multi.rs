//! SDXL base across GPUs: every plan timed against one GPU in one process (issue 21).
//!
//! Builds [`SdxlPipeline::random_base`] (UNet 2.57 B, both CLIP encoders, VAE; bf16, random
//! weights of SDXL base 1.0's shapes from `--seed`) on the first of `--devices`, then for each
//! `--plans` entry runs what a request runs, through the product's engines (for `single`, what
//! [`SdxlPipeline`]'s `generate` runs, keeping the latents; [`ParallelPipeline`] with NCCL, or
//! the threads backend, otherwise): a warm-up request of `--warmup-steps` steps, then `--runs`
//! timed requests of `--steps` Euler steps at `--size`² with classifier-free guidance (guidance
//! 5, no negative prompt: SDXL's zeros, a UNet batch of 2 or one row per CFG branch). Per plan,
//! one JSON line:
//!
//! * `step_ms_median` / `step_ms_min` / `step_ms`: intervals between the loop's step events (the
//!   leader reports a step after a device sync), over every timed run;
//! * `loop_s`, `encode_s`, `decode_s` (the engine's stage timings) and `e2e_s` (wall time of
//!   `generate`) of the fastest timed run;
//! * `peak_alloc_gib` per device: libtorch's peak allocated bytes from the end of the warm-up to
//!   the end of the timed runs (every rank is a thread of this process, so each device's
//!   allocator is read here; on one device, with the stage peaks the engine reports);
//!   `peak_nvml_gib` per device: NVML's used memory sampled every 20 ms from the plan's build to
//!   its end (context and libtorch's cache included); `build_peak_alloc_gib`: the allocated peak
//!   while the plan's engine was built (the weights and their replicas);
//! * `latent_rel_l2_vs_single` (final latents) and `image_psnr_vs_single_db` (RGB8) against the
//!   `single` plan of the same size earlier in this process (put `single` first).
//!
//! ```text
//! sdxl_multi --size 1024 --steps 30 --plans all --devices all [--runs 2] [--warmup-steps 3]
//!            [--backend nccl|threads] [--seed 0] [--json-out FILE] [--tiny --cpu]
//! ```
//! `--plans all`: `single`, then every UNet plan ([`Plan::unet_candidates`] with CFG) on 2, 4, 8,
//! ... of the devices (powers of two up to their count, and the count itself): `patch=2;cfg=2;
//! patch=4;cfg=2,patch=2;patch=8;cfg=2,patch=4` on eight (`all` may stand among other plans:
//! `all;single@reference`). A plan may carry `@VARIANT` (a [`Perf`] spec, e.g.
//! `single@reference`): the leader's fast paths are set to it before that plan and set back after
//! it (in a parallel plan the leader's UNet computes rank 0's band with them; the other ranks'
//! replicas are built with none).
//! `--devices 0,0,0,0 --backend threads`: every rank a thread on one GPU (timings meaningless,
//! numerics the plans' own). `--tiny --cpu`: the tiny random SDXL on the CPU, ranks as threads
//! (`--devices` gives only the rank count): a dry run of every code path.
//! `--json-out FILE` appends each line as soon as its plan finished (a killed process keeps the
//! finished plans); a plan that fails gives a line with `error` and the next plan runs.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ditfleet_engine::aten;
use ditfleet_engine::models::sdxl::fast::Perf;
use ditfleet_engine::models::sdxl::{PipelineOptions, SdxlPipeline};
use ditfleet_engine::models::{self, DiffusionModel};
use ditfleet_engine::parallel::{CommFactory, NcclFactory, ParallelPipeline, Plan, ThreadsFactory, nccl};
use ditfleet_engine::{Control, Engine, GenerateRequest, GeneratedImage};
use serde_json::{Value, json};
use tch::{Device, Kind, Tensor};

/// One entry of `--plans`: the plan and the leader's fast paths for it (`None` = as built).
#[derive(Clone)]
struct PlanRun {
    plan: Plan,
    variant: Option<(String, Perf)>,
}

impl PlanRun {
    fn label(&self) -> String {
        match &self.variant {
            Some((spec, _)) => format!("{}@{spec}", self.plan),
            None => self.plan.to_string(),
        }
    }
}

struct Args {
    size: u32,
    steps: u32,
    runs: usize,
    warmup_steps: u32,
    plans: Vec<PlanRun>,
    devices: Vec<i32>,
    backend: String,
    seed: u64,
    tiny: bool,
    cpu: bool,
    json_out: Option<PathBuf>,
}

fn parse_plan(s: &str) -> Result<PlanRun> {
    let (plan, variant) = match s.split_once('@') {
        Some((p, v)) => (p, Some(v.trim())),
        None => (s, None),
    };
    let plan: Plan = plan.parse().map_err(anyhow::Error::msg)?;
    let variant = variant
        .map(|v| Perf::parse(v).map(|p| (v.to_string(), p)))
        .transpose()
        .map_err(anyhow::Error::msg)?;
    Ok(PlanRun { plan, variant })
}

/// `single`, then [`Plan::unet_candidates`] (with CFG) on 2, 4, 8, ... devices up to `n`, and on
/// `n` itself when it is not a power of two.
fn all_plans(n: usize) -> Vec<PlanRun> {
    let mut counts: Vec<usize> = std::iter::successors(Some(2usize), |g| g.checked_mul(2))
        .take_while(|&g| g <= n)
        .collect();
    if n > 1 && !n.is_power_of_two() {
        counts.push(n);
    }
    std::iter::once(Plan::SINGLE)
        .chain(counts.into_iter().flat_map(|g| Plan::unet_candidates(g, true)))
        .map(|plan| PlanRun { plan, variant: None })
        .collect()
}

fn parse() -> Result<Args> {
    let mut a = Args {
        size: 1024,
        steps: 30,
        runs: 2,
        warmup_steps: 3,
        plans: Vec::new(),
        devices: vec![0],
        backend: "nccl".into(),
        seed: 0,
        tiny: false,
        cpu: false,
        json_out: None,
    };
    let mut plans = "all".to_string();
    let mut devices = "0".to_string();
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--size" => a.size = val()?.parse()?,
            "--steps" => a.steps = val()?.parse()?,
            "--runs" => a.runs = val()?.parse::<usize>()?.max(1),
            "--warmup-steps" => a.warmup_steps = val()?.parse::<u32>()?.max(1),
            "--seed" => a.seed = val()?.parse()?,
            "--plans" => plans = val()?,
            "--devices" => devices = val()?,
            "--backend" => {
                a.backend = val()?;
                if a.backend != "nccl" && a.backend != "threads" {
                    bail!("--backend is nccl or threads, not {}", a.backend);
                }
            }
            "--json-out" => a.json_out = Some(val()?.into()),
            "--tiny" => a.tiny = true,
            "--cpu" => a.cpu = true,
            "-h" | "--help" => {
                println!("see the doc comment of worker/engine/examples/sdxl_multi.rs");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    if a.tiny != a.cpu {
        bail!("--tiny and --cpu go together (the tiny pipeline is built on the CPU in fp32)");
    }
    a.devices = if devices == "all" {
        let n = tch::Cuda::device_count();
        if n < 1 {
            bail!("--devices all: no CUDA device");
        }
        (0..n as i32).collect()
    } else {
        devices
            .split(',')
            .map(|d| d.trim().parse::<i32>())
            .collect::<Result<_, _>>()?
    };
    if a.cpu {
        a.backend = "threads".into();
        if a.size == 1024 {
            a.size = 64;
        }
    }
    if !a.size.is_multiple_of(8) {
        bail!("--size must be a multiple of 8");
    }
    a.plans = Vec::new();
    for p in plans.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        if p == "all" {
            a.plans.extend(all_plans(a.devices.len()));
        } else {
            a.plans.push(parse_plan(p)?);
        }
    }
    Ok(a)
}

fn build(a: &Args) -> Result<SdxlPipeline> {
    if a.tiny {
        return Ok(SdxlPipeline::tiny_random(a.seed)?);
    }
    let options = PipelineOptions::new(Device::Cuda(a.devices[0] as usize), Kind::BFloat16);
    Ok(SdxlPipeline::random_base(options, a.seed)?)
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

/// Samples every GPU's used memory (NVML) while alive; `peaks()` = max per device, GiB (NaN
/// where NVML is missing, e.g. on a CPU machine).
struct MemSampler {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<Vec<f64>>>,
}

impl MemSampler {
    fn start(devices: Vec<i32>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let Ok(nvml) = nvml_wrapper::Nvml::init() else {
                return vec![f64::NAN; devices.len()];
            };
            let mut peaks = vec![0f64; devices.len()];
            while !s.load(Ordering::Relaxed) {
                for (i, d) in devices.iter().enumerate() {
                    if let Ok(m) = nvml.device_by_index(*d as u32).and_then(|dev| dev.memory_info()) {
                        peaks[i] = peaks[i].max(m.used as f64 / (1u64 << 30) as f64);
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            peaks
        });
        Self {
            stop,
            handle: Some(handle),
        }
    }

    fn peaks(mut self) -> Vec<f64> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default()
    }
}

/// libtorch's peak allocated bytes on each CUDA ordinal since the last reset, GiB, resetting it
/// (`None` on the CPU).
fn alloc_peaks(ordinals: &[i32], cpu: bool) -> Option<Vec<f64>> {
    if cpu {
        return None;
    }
    Some(
        ordinals
            .iter()
            .map(|&i| {
                aten::memory_peak(i as usize, true)
                    .map(|b| b as f64 / (1u64 << 30) as f64)
                    .unwrap_or(f64::NAN)
            })
            .collect(),
    )
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

/// Relative L2 of `a` against `b` (both moved to the CPU in fp32).
fn rel_l2(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_device(Device::Cpu).to_kind(Kind::Float);
    let b = b.to_device(Device::Cpu).to_kind(Kind::Float);
    if a.size() != b.size() {
        bail!("latents {:?} vs the single plan's {:?}", a.size(), b.size());
    }
    Ok(f64::try_from((&a - &b).norm())? / f64::try_from(b.norm())?)
}

/// One timed request: the image, its step intervals (ms), host ms per step, wall seconds, and
/// (one device) the final latents.
struct Run {
    image: GeneratedImage,
    step_ms: Vec<f64>,
    host_ms: Vec<f64>,
    e2e_s: f64,
    latents: Option<Tensor>,
}

/// A request through a [`ParallelPipeline`] (`Engine::generate`).
fn timed(engine: &mut dyn Engine, req: &GenerateRequest) -> Result<Run> {
    let mut step_ms = Vec::new();
    let mut host_ms = Vec::new();
    let mut prev = Duration::ZERO;
    let t = Instant::now();
    let image = engine.generate(req, &mut |ev| {
        step_ms.push((ev.elapsed - prev).as_secs_f64() * 1e3);
        host_ms.push(ev.host.as_secs_f64() * 1e3);
        prev = ev.elapsed;
        Control::Continue
    })?;
    Ok(Run {
        image,
        step_ms,
        host_ms,
        e2e_s: t.elapsed().as_secs_f64(),
        latents: None,
    })
}

/// A request on one device, as `Engine::generate` runs it ([`models::generate`]: the encode and
/// loop of [`models::denoise_request`], then the model's decode), keeping the final latents.
fn timed_single(p: &SdxlPipeline, req: &GenerateRequest) -> Result<Run> {
    let mut step_ms = Vec::new();
    let mut host_ms = Vec::new();
    let mut prev = Duration::ZERO;
    let t = Instant::now();
    let d = models::denoise_request(p, req, None, 0, &mut |_| {}, &mut |ev| {
        step_ms.push((ev.elapsed - prev).as_secs_f64() * 1e3);
        host_ms.push(ev.host.as_secs_f64() * 1e3);
        prev = ev.elapsed;
        Control::Continue
    })?;
    let t2 = Instant::now();
    let rgb = p.decode(&d.latents, req)?;
    let mut timings = d.timings;
    timings.decode_ms = t2.elapsed().as_secs_f64() * 1e3;
    Ok(Run {
        image: GeneratedImage {
            width: req.width,
            height: req.height,
            rgb,
            timings,
        },
        step_ms,
        host_ms,
        e2e_s: t.elapsed().as_secs_f64(),
        latents: Some(d.latents),
    })
}

enum Eng {
    One(Box<SdxlPipeline>),
    Par(Box<ParallelPipeline<SdxlPipeline>>),
}

impl Eng {
    fn as_engine(&mut self) -> &mut dyn Engine {
        match self {
            Eng::One(p) => p.as_mut(),
            Eng::Par(p) => p.as_mut(),
        }
    }
}

/// The single plan's final latents and image, for the others to be compared with.
struct Reference {
    latents: Tensor,
    rgb: Vec<u8>,
}

/// Runs one plan on `leader` (given back in the returned slot, when the plan did not lose it).
fn run_plan(
    a: &Args,
    pr: &PlanRun,
    leader: &mut Option<SdxlPipeline>,
    reference: &mut Option<Reference>,
) -> Result<Value> {
    let plan = pr.plan;
    let world = plan.world();
    if world > a.devices.len() {
        bail!("{plan} needs {world} devices, --devices has {}", a.devices.len());
    }
    let used: Vec<i32> = a.devices[..world].to_vec();
    let mut ordinals = used.clone();
    ordinals.sort_unstable();
    ordinals.dedup();
    let devices: Vec<Device> = used
        .iter()
        .map(|&d| {
            if a.cpu {
                Device::Cpu
            } else {
                Device::Cuda(d as usize)
            }
        })
        .collect();
    let mut p = match leader.take() {
        Some(p) => p,
        None => build(a)?,
    };
    if let Some((_, perf)) = &pr.variant {
        p.set_perf(*perf)?;
    }
    let leader_perf = p.options().perf.name();
    let graphs_before = p.graph_counts();
    if !a.cpu {
        aten::empty_cache()?;
    }
    let sampler = MemSampler::start(if a.cpu { Vec::new() } else { ordinals.clone() });
    let t_build = Instant::now();
    let single = plan == Plan::SINGLE;
    let mut engine = if single {
        Eng::One(Box::new(p))
    } else {
        let factory: Box<dyn CommFactory + Send> = if a.backend == "threads" {
            Box::new(ThreadsFactory {
                device: devices[0],
                timeout: Duration::from_secs(600),
            })
        } else {
            Box::new(NcclFactory {
                devices: used.clone(),
            })
        };
        Eng::Par(Box::new(ParallelPipeline::new(vec![p], &devices, plan, factory)?))
    };
    let build_s = t_build.elapsed().as_secs_f64();
    let build_peak = alloc_peaks(&ordinals, a.cpu);
    let t_warm = Instant::now();
    let warm = request(a.size, a.warmup_steps, a.seed);
    engine.as_engine().generate(&warm, &mut |_| Control::Continue)?;
    let warmup_s = t_warm.elapsed().as_secs_f64();
    let _ = alloc_peaks(&ordinals, a.cpu);
    let req = request(a.size, a.steps, a.seed);
    let mut runs = Vec::with_capacity(a.runs);
    for _ in 0..a.runs {
        runs.push(match &engine {
            Eng::One(p) => timed_single(p, &req)?,
            Eng::Par(_) => timed(engine.as_engine(), &req)?,
        });
    }
    // The one-device path resets the leader device's peak at each of its stages and reports the
    // stage peaks: the leader's peak is the larger of those and what was left since.
    let stage_peak = runs
        .iter()
        .flat_map(|r| {
            let t = &r.image.timings;
            [
                t.peak_memory_bytes,
                t.peak_memory_encode_bytes,
                t.peak_memory_denoise_bytes,
                t.peak_memory_decode_bytes,
            ]
        })
        .flatten()
        .max()
        .map(|b| b as f64 / (1u64 << 30) as f64);
    let peak_alloc = alloc_peaks(&ordinals, a.cpu).map(|mut v| {
        if let (Some(sp), Some(i)) = (stage_peak, ordinals.iter().position(|&o| o == used[0])) {
            v[i] = v[i].max(sp);
        }
        v
    });
    let peak_nvml = sampler.peaks();
    let best = runs
        .iter()
        .min_by(|x, y| x.e2e_s.total_cmp(&y.e2e_s))
        .context("no timed run")?;
    let (latents, p, graphs) = match engine {
        Eng::One(p) => {
            let l = best.latents.as_ref().context("no latents")?.shallow_clone();
            let after = p.graph_counts();
            (
                l,
                *p,
                Some((after.0 - graphs_before.0, after.1 - graphs_before.1)),
            )
        }
        Eng::Par(e) => {
            let l = e.last_latents().first().context("no latents")?.shallow_clone();
            let p = e.into_leaders().pop().context("leader not returned")?;
            (l, p, None)
        }
    };
    *leader = Some(p);
    let latents = latents.to_device(Device::Cpu).to_kind(Kind::Float);
    let image = &best.image;
    let (rl2, ps) = match reference.as_ref() {
        Some(r) if !single || pr.variant.is_some() => (
            Some(rel_l2(&latents, &r.latents)?),
            Some(psnr(&image.rgb, &r.rgb)),
        ),
        _ => (None, None),
    };
    if single && reference.is_none() {
        *reference = Some(Reference {
            latents: latents.shallow_clone(),
            rgb: image.rgb.clone(),
        });
    }
    let steps: Vec<f64> = runs.iter().flat_map(|r| r.step_ms.iter().copied()).collect();
    let hosts: Vec<f64> = runs.iter().flat_map(|r| r.host_ms.iter().copied()).collect();
    let t = &image.timings;
    Ok(json!({
        "bench": "sdxl_multi",
        "model": if a.tiny { "sdxl tiny random" } else { "sdxl-base shapes, random weights" },
        "plan": pr.label(),
        "gpus": world,
        "devices": used,
        "size": a.size,
        "steps": a.steps,
        "runs": a.runs,
        "guidance": 5.0,
        "backend": if single { "none" } else { a.backend.as_str() },
        "leader_perf": leader_perf,
        "graph_captures_replays": graphs,
        "build_s": build_s,
        "warmup_s": warmup_s,
        "step_ms_median": median(&steps),
        "step_ms_min": steps.iter().copied().fold(f64::INFINITY, f64::min),
        "host_ms_median": median(&hosts),
        "step_ms": best.step_ms,
        "loop_s": t.denoise_ms / 1e3,
        "loop_s_all": runs.iter().map(|r| r.image.timings.denoise_ms / 1e3).collect::<Vec<_>>(),
        "encode_s": t.encode_ms / 1e3,
        "decode_s": t.decode_ms / 1e3,
        "e2e_s": best.e2e_s,
        "e2e_s_all": runs.iter().map(|r| r.e2e_s).collect::<Vec<_>>(),
        "build_peak_alloc_gib": build_peak,
        "peak_alloc_gib": peak_alloc,
        "peak_nvml_gib": peak_nvml,
        "engine_plan": t.plan,
        "latent_rel_l2_vs_single": rl2,
        "image_psnr_vs_single_db": ps.filter(|v| v.is_finite()),
        "image_identical_to_single": ps.map(|v| v.is_infinite()),
        "image_mean": image.rgb.iter().map(|&v| f64::from(v)).sum::<f64>() / image.rgb.len().max(1) as f64,
    }))
}

fn emit(a: &Args, line: &Value) -> Result<()> {
    let text = line.to_string();
    println!("{text}");
    eprintln!("{text}");
    if let Some(path) = &a.json_out {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        writeln!(f, "{text}")?;
    }
    Ok(())
}

fn main() -> Result<()> {
    // Engine logs (plan changes, graph captures, aborts) on stderr; RUST_LOG overrides.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let a = parse()?;
    let _guard = tch::no_grad_guard();
    if !a.cpu {
        let version = nccl::check_single_nccl().map_err(anyhow::Error::msg);
        eprintln!("cuda devices: {}, NCCL: {version:?}", tch::Cuda::device_count());
    }
    eprintln!(
        "plans: {}",
        a.plans.iter().map(PlanRun::label).collect::<Vec<_>>().join("; ")
    );
    let t = Instant::now();
    let mut leader = Some(build(&a)?);
    eprintln!("random SDXL pipeline built in {:.1} s", t.elapsed().as_secs_f64());
    let base_perf = leader.as_ref().map(|p| p.options().perf).context("no leader")?;
    let mut reference = None;
    for pr in &a.plans {
        let line = match run_plan(&a, pr, &mut leader, &mut reference) {
            Ok(v) => v,
            Err(e) => json!({
                "bench": "sdxl_multi", "plan": pr.label(), "gpus": pr.plan.world(), "size": a.size,
                "steps": a.steps, "error": format!("{e:#}"),
            }),
        };
        emit(&a, &line)?;
        // A plan's `@VARIANT` holds for that plan only.
        if let (Some(p), Some(_)) = (leader.as_mut(), &pr.variant) {
            p.set_perf(base_perf)?;
        }
    }
    Ok(())
}
