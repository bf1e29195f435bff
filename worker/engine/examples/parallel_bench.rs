//! Multi-GPU Flux.1-dev benchmark and exactness check (NCCL backend).
//!
//! Builds the FULL-SIZE Flux.1-dev pipeline (transformer, T5-XXL, CLIP-L, VAE) with random
//! weights from a fixed seed, then for each `--plans` entry: a warm-up generation, then `--runs`
//! timed generations of `--steps` steps at `--size`², through the product's engines
//! ([`Pipeline`] for `single`, [`ParallelPipeline`] otherwise). Per plan it reports per-step ms
//! (median of the intervals between step events, which the leader emits after a device sync),
//! loop / encode / decode / end-to-end seconds, peak GPU memory per device (NVML, sampled every
//! 20 ms; includes libtorch's cache), and, against the `single` plan of the same process, the
//! relative L2 of the final latents and the PSNR of the images. One JSON line per plan on stdout.
//!
//! ```text
//! parallel_bench --size 1024 --steps 28 --plans 'single;ulysses=2;ring=2' --devices 0,1
//! parallel_bench --size 1024 --steps 28 --plans all --devices 0,1,2,3   (single + every valid plan)
//!   [--runs 2] [--warmup-steps 2] [--true-cfg] [--seed 0] [--backend nccl|threads] [--fp8]
//! ```
//!
//! `--backend threads --devices 0,0,0,0` runs every rank as a thread on ONE GPU with the
//! in-process backend (device-to-device copies instead of NCCL; steps run eagerly, since its
//! exchanges go through the host and cannot be captured). The ranks share the GPU, so the
//! timings mean nothing; the latents are the plan's own, which checks the multi-GPU code path
//! (fused kernels included) at full size where only one GPU is at hand.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ditfleet_engine::flux::Pipeline;
use ditfleet_engine::parallel::{CommFactory, NcclFactory, ParallelPipeline, Plan, ThreadsFactory, nccl};
use ditfleet_engine::{Control, Engine, GenerateRequest, GeneratedImage};
use tch::{Device, Kind, Tensor};

struct Args {
    /// `--fp8`: every pipeline's transformer blocks quantised to FP8 (`Pipeline::quantize_fp8`).
    fp8: bool,
    size: u32,
    steps: u32,
    runs: usize,
    warmup_steps: u32,
    plans: Vec<Plan>,
    devices: Vec<i32>,
    true_cfg: bool,
    seed: u64,
    /// `nccl` (default) or `threads` (every rank a thread, see the module docs).
    backend: String,
    /// Diagnostics instead of plans: independent pipelines on every device at once (do rank
    /// threads compute in parallel?) and NCCL point-to-point / all-to-all bandwidth.
    diag: bool,
    /// GPU-isolation drill: `slot:step` — the device in that slot fails at that step; the first
    /// plan runs under `ResilientParallel` twice and the outcome is reported.
    fault: Option<(usize, u32, bool)>,
}

/// The random-weight Flux.1-dev pipeline in bf16, its blocks quantised to FP8 with `fp8`.
fn random_dev(d: Device, seed: u64, fp8: bool) -> Result<Pipeline, ditfleet_engine::EngineError> {
    let mut p = Pipeline::random_dev(d, Kind::BFloat16, seed)?;
    if fp8 {
        p.quantize_fp8()?;
    }
    Ok(p)
}

fn parse() -> Result<Args> {
    let mut a = Args {
        size: 1024,
        steps: 28,
        runs: 2,
        warmup_steps: 2,
        plans: vec![Plan::SINGLE],
        devices: vec![0],
        true_cfg: false,
        seed: 0,
        backend: "nccl".into(),
        diag: false,
        fault: None,
        fp8: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--size" => a.size = val()?.parse()?,
            "--steps" => a.steps = val()?.parse()?,
            "--runs" => a.runs = val()?.parse()?,
            "--warmup-steps" => a.warmup_steps = val()?.parse()?,
            "--seed" => a.seed = val()?.parse()?,
            "--true-cfg" => a.true_cfg = true,
            "--fp8" => a.fp8 = true,
            "--backend" => {
                a.backend = val()?;
                if a.backend != "nccl" && a.backend != "threads" {
                    bail!("--backend is nccl or threads, not {}", a.backend);
                }
            }
            "--diag" => a.diag = true,
            "--fault" => {
                let v = val()?;
                let mut it = v.split(':');
                let slot = it.next().context("--fault slot:step[:hang]")?.parse()?;
                let step = it.next().context("--fault slot:step[:hang]")?.parse()?;
                a.fault = Some((slot, step, it.next() == Some("hang")));
            }
            "--plans" => {
                let v = val()?;
                a.plans = if v == "all" {
                    Vec::new()
                } else {
                    v.split(';')
                        .map(|p| p.parse::<Plan>().map_err(anyhow::Error::msg))
                        .collect::<Result<_>>()?
                };
            }
            "--devices" => {
                a.devices = val()?
                    .split(',')
                    .map(|d| d.parse::<i32>())
                    .collect::<Result<_, _>>()?
            }
            other => bail!("unknown argument {other}"),
        }
    }
    if a.plans.is_empty() {
        // `--plans all`: one GPU, then every valid plan over all of --devices (Flux: 24 heads).
        a.plans = std::iter::once(Plan::SINGLE)
            .chain(Plan::candidates(24, a.devices.len(), a.true_cfg))
            .collect();
    }
    Ok(a)
}

/// Samples every GPU's used memory (NVML) while alive; `peaks()` = max per device, GiB.
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

fn request(a: &Args, steps: u32) -> GenerateRequest {
    GenerateRequest {
        model: "flux-dev".into(),
        prompt: "a red fox in fresh snow, golden hour, 35mm photo".into(),
        negative_prompt: a.true_cfg.then(|| "blurry, low quality".into()),
        width: a.size,
        height: a.size,
        steps,
        guidance: 3.5,
        true_cfg_scale: if a.true_cfg { 4.0 } else { 1.0 },
        plan: None,
        seed: a.seed,
        scheduler: None,
        loras: Vec::new(),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
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

fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_device(Device::Cpu).to_kind(Kind::Float);
    let b = b.to_device(Device::Cpu).to_kind(Kind::Float);
    f64::try_from((&a - &b).norm()).unwrap_or(f64::NAN) / f64::try_from(b.norm()).unwrap_or(f64::NAN)
}

/// The last image, the step ms and host ms of every step of every run, end-to-end s per run.
type Timed = (GeneratedImage, Vec<f64>, Vec<f64>, Vec<f64>);

/// Times `runs` generations (see [`Timed`]).
fn timed(engine: &mut dyn Engine, req: &GenerateRequest, runs: usize) -> Result<Timed> {
    let mut step_ms = Vec::new();
    let mut host_ms = Vec::new();
    let mut e2e = Vec::new();
    let mut last = None;
    for _ in 0..runs {
        let mut prev = Duration::ZERO;
        let t = Instant::now();
        let im = engine.generate(req, &mut |ev| {
            step_ms.push((ev.elapsed - prev).as_secs_f64() * 1e3);
            host_ms.push(ev.host.as_secs_f64() * 1e3);
            prev = ev.elapsed;
            Control::Continue
        })?;
        e2e.push(t.elapsed().as_secs_f64());
        last = Some(im);
    }
    Ok((last.context("no run")?, step_ms, host_ms, e2e))
}

fn main() -> Result<()> {
    // Engine logs (plan changes, graph captures, aborts, quarantines) on stderr; RUST_LOG overrides.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let a = parse()?;
    let _guard = tch::no_grad_guard();
    let version = nccl::check_single_nccl().map_err(anyhow::Error::msg);
    eprintln!("cuda devices: {}, NCCL: {version:?}", tch::Cuda::device_count());
    if a.diag {
        return diag(&a);
    }
    if let Some(f) = a.fault {
        return drill(&a, f);
    }
    let t = Instant::now();
    let mut leader = Some(random_dev(Device::Cuda(a.devices[0] as usize), a.seed, a.fp8)?);
    eprintln!(
        "random Flux.1-dev pipeline built in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let mut reference: Option<(Tensor, Vec<u8>)> = None;
    for plan in &a.plans {
        let devices: Vec<Device> = a.devices.iter().map(|d| Device::Cuda(*d as usize)).collect();
        let used: Vec<i32> = a.devices[..plan.world().min(a.devices.len())].to_vec();
        let p = leader.take().context("leader lost")?;
        let sampler = MemSampler::start(used.clone());
        let t_build = Instant::now();
        let single = *plan == Plan::SINGLE;
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
                    devices: a.devices.clone(),
                })
            };
            Eng::Par(Box::new(ParallelPipeline::new(
                vec![p],
                &devices,
                *plan,
                factory,
            )?))
        };
        let build_s = t_build.elapsed().as_secs_f64();
        let warm = request(&a, a.warmup_steps);
        engine.as_engine().generate(&warm, &mut |_| Control::Continue)?;
        let req = request(&a, a.steps);
        let (image, step_ms, host_ms, e2e) = timed(engine.as_engine(), &req, a.runs)?;
        let peaks = sampler.peaks();
        let (latents, p) = match engine {
            // The one-device engine returns only the image: recompute its latents (deterministic).
            Eng::One(p) => {
                let (txt, pooled) = p.encode_prompt(&req.prompt)?;
                let neg = req
                    .true_cfg()
                    .then(|| p.encode_prompt(req.negative_prompt.as_deref().unwrap_or_default()))
                    .transpose()?;
                let (l, _) = p.denoise(
                    &txt,
                    &pooled,
                    neg.as_ref().map(|(x, y)| (x, y)),
                    &req,
                    &mut |_| Control::Continue,
                )?;
                (l, *p)
            }
            Eng::Par(e) => {
                let l = e.last_latents().first().context("no latents")?.shallow_clone();
                let mut leaders = e.into_leaders();
                if plan.pipefusion > 1 {
                    // A PipeFusion leader keeps only stage 0's blocks, so the engine does not hand
                    // it back: rebuild the same random weights.
                    drop(leaders);
                    (l, random_dev(devices[0], a.seed, a.fp8)?)
                } else {
                    (l, leaders.pop().context("leader not returned")?)
                }
            }
        };
        leader = Some(p);
        let latents = latents.to_device(Device::Cpu).to_kind(Kind::Float);
        let (rl2, ps) = match &reference {
            Some((l, rgb)) => (rel_l2(&latents, l), psnr(&image.rgb, rgb)),
            None => (0.0, f64::INFINITY),
        };
        if single {
            reference = Some((latents.shallow_clone(), image.rgb.clone()));
        }
        let t = &image.timings;
        let line = serde_json::json!({
            "plan": plan.to_string(),
            "gpus": plan.world(),
            "size": a.size,
            "steps": a.steps,
            "true_cfg": a.true_cfg,
            "backend": if single { "none" } else { a.backend.as_str() },
            "build_s": build_s,
            "step_ms_median": median(step_ms.clone()),
            "step_ms_min": step_ms.iter().cloned().fold(f64::INFINITY, f64::min),
            "host_ms_median": median(host_ms),
            "cuda_graphs": std::env::var("DITFLEET_CUDA_GRAPHS").unwrap_or_else(|_| "on".into()),
            "attn_lse_calls_cudnn_flash_efficient": ditfleet_engine::aten::attention_lse_calls(),
            "loop_s": t.denoise_ms / 1e3,
            "encode_s": t.encode_ms / 1e3,
            "decode_s": t.decode_ms / 1e3,
            "e2e_s": e2e.iter().cloned().fold(f64::INFINITY, f64::min),
            "peak_gib": peaks,
            "latent_rel_l2_vs_single": if reference.is_some() { Some(rl2) } else { None },
            "image_psnr_vs_single_db": if ps.is_finite() { Some(ps) } else { None },
        });
        println!("{line}");
        eprintln!("{line}");
    }
    Ok(())
}

enum Eng {
    One(Box<Pipeline>),
    Par(Box<ParallelPipeline<Pipeline>>),
}

impl Eng {
    fn as_engine(&mut self) -> &mut dyn Engine {
        match self {
            Eng::One(p) => p.as_mut(),
            Eng::Par(p) => p.as_mut(),
        }
    }
}

/// See [`Args::diag`]. Prints JSON lines.
fn diag(a: &Args) -> Result<()> {
    // 1. Independent one-device pipelines, one thread per device, at the same time.
    let mut pipes = Vec::new();
    for &d in &a.devices {
        pipes.push(random_dev(Device::Cuda(d as usize), a.seed, a.fp8)?);
    }
    for concurrent in [false, true] {
        let barrier = Arc::new(std::sync::Barrier::new(if concurrent { pipes.len() } else { 1 }));
        let n = if concurrent { pipes.len() } else { 1 };
        let results: Vec<Result<f64>> = std::thread::scope(|s| {
            let hs: Vec<_> = pipes
                .iter_mut()
                .take(n)
                .map(|p| {
                    let barrier = barrier.clone();
                    let req = request(a, a.steps);
                    s.spawn(move || -> Result<f64> {
                        if let Device::Cuda(i) = p.options().devices.transformer {
                            nccl::bind_thread_to_device(i).map_err(anyhow::Error::msg)?;
                        }
                        p.generate(&request(a, 2), &mut |_| Control::Continue)?;
                        barrier.wait();
                        let mut steps = Vec::new();
                        let mut prev = Duration::ZERO;
                        p.generate(&req, &mut |ev| {
                            steps.push((ev.elapsed - prev).as_secs_f64() * 1e3);
                            prev = ev.elapsed;
                            Control::Continue
                        })?;
                        Ok(median(steps))
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().expect("thread")).collect()
        });
        let ms: Vec<f64> = results.into_iter().collect::<Result<_>>()?;
        println!(
            "{}",
            serde_json::json!({"diag": "independent_pipelines", "threads": n, "step_ms_median": ms})
        );
    }
    drop(pipes);
    // 2. NCCL bandwidth between the first two devices.
    let comms = ditfleet_engine::parallel::NcclComm::init_all(&a.devices[..2]).map_err(anyhow::Error::msg)?;
    let mb = 64i64;
    let out: Vec<Result<(f64, f64)>> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .map(|c| {
                s.spawn(move || -> Result<(f64, f64)> {
                    use ditfleet_engine::parallel::Communicator;
                    let dev = c.device();
                    if let Device::Cuda(i) = dev {
                        nccl::bind_thread_to_device(i).map_err(anyhow::Error::msg)?;
                    }
                    let n = mb * (1 << 20) / 2;
                    let t = Tensor::ones([n], (Kind::BFloat16, dev));
                    let peer = 1 - c.rank();
                    let time = |f: &dyn Fn() -> Result<Tensor>| -> Result<f64> {
                        let _ = f()?.to_device(Device::Cpu);
                        let t0 = Instant::now();
                        let mut last = None;
                        for _ in 0..20 {
                            last = Some(f()?);
                        }
                        let _ = last.context("none")?.sum(Kind::Float).double_value(&[]);
                        Ok(t0.elapsed().as_secs_f64() / 20.0)
                    };
                    let sr = time(&|| {
                        c.send_recv(&t, peer, &[n], Kind::BFloat16, peer)
                            .map_err(anyhow::Error::msg)
                    })?;
                    let halves = t.split(n / 2, 0);
                    let a2a = time(&|| {
                        Ok(Tensor::cat(
                            &c.all_to_all(&halves, &[vec![n / 2], vec![n / 2]])
                                .map_err(anyhow::Error::msg)?,
                            0,
                        ))
                    })?;
                    Ok((mb as f64 / 1024.0 / sr, mb as f64 / 2.0 / 1024.0 / a2a))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    for (rank, r) in out.into_iter().enumerate() {
        let (sr, a2a) = r?;
        println!(
            "{}",
            serde_json::json!({"diag": "nccl_bandwidth", "rank": rank, "mib": mb,
                "send_recv_gib_s": sr, "all_to_all_cross_gib_s": a2a})
        );
    }
    Ok(())
}

/// See [`Args::fault`].
fn drill(a: &Args, (slot, step, hang): (usize, u32, bool)) -> Result<()> {
    use ditfleet_engine::parallel::{InjectedFault, ResilientParallel};
    let (seed, fp8) = (a.seed, a.fp8);
    let devices: Vec<Device> = a.devices.iter().map(|d| Device::Cuda(*d as usize)).collect();
    let plan = *a.plans.first().context("--plans")?;
    let mut e = ResilientParallel::new(
        devices,
        plan,
        Box::new(move |d| random_dev(d, seed, fp8)),
        Box::new(
            |devs: &[Device]| -> Box<dyn ditfleet_engine::parallel::CommFactory + Send> {
                Box::new(NcclFactory::from_devices(devs).expect("--devices are CUDA ordinals"))
            },
        ),
        Some(InjectedFault { slot, step, hang }),
    )?;
    let req = request(a, a.steps);
    for job in 1..=2 {
        let t = Instant::now();
        let mut steps = Vec::new();
        let r = e.generate(&req, &mut |ev| {
            steps.push(ev.step);
            Control::Continue
        });
        let line = serde_json::json!({
            "drill": "gpu_isolation",
            "job": job,
            "ok": r.is_ok(),
            "error": r.as_ref().err().map(|e| e.to_string()),
            "plan_ran": r.as_ref().ok().and_then(|im| im.timings.plan.clone()),
            "steps_reported": steps,
            "seconds": t.elapsed().as_secs_f64(),
            "degraded": e.degraded(),
            "devices_now": e.info().devices,
        });
        println!("{line}");
    }
    Ok(())
}
