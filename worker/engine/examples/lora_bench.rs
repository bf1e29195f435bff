//! LoRA merge benchmark (`ditfleet_engine::lora`) on Flux.1-dev at full size with random weights.
//!
//! Writes random PEFT-format adapters (bf16, every Linear module of the transformer and CLIP, as
//! LoRAs trained on "all linear layers" are) of each rank in `--ranks`, then for stacks of each
//! size in `--stacks` times, on the pipeline's own weights:
//!
//! * `cold`: read the files (page cache warm: they were just written) into an empty host cache,
//!   then merge; `cold_read_ms` is the reading alone;
//! * `warm_host`: adapters in the host cache (page-locked on CUDA unless `--no-pin`), merge;
//! * `warm_device`: adapters also kept on the GPU (`ApplyOptions::device_cache_bytes`), merge
//!   (`warm_device_blocked_ms`: the default kernel with its product in L2-sized blocks,
//!   `SPLIT_BLOCK_BYTES`; `warm_device_fp32_ms`: the `Fp32` merge kernel);
//! * `hot`: the same stack again (nothing to do);
//! * `switch`: from another stack of the same size to this one (the weights both touch are
//!   re-merged from the saved originals, no restore in between);
//! * `restore`: back to the base weights;
//!
//! each the median of `--repeats`; and the same through the engine's per-job path
//! ([`ditfleet_engine::lora::LoraSlot::prepare`] with the jobs' `LoraRef`s, as
//! `Pipeline::generate` runs it) for the largest stack of the largest rank: `engine.cold_ms` (a
//! fresh host cache reads the files), `engine.hot_ms` (the same stack again: no cache lookup, no
//! merge), `engine.restore_ms` (a job without adapters), `engine.warm_ms` (the stack again, from
//! the device cache an engine keeps by default, `DITFLEET_LORA_DEVICE_CACHE_BYTES`). Then the denoising step time (1024², 512 text tokens, bf16,
//! rows of the modulation table as the pipeline runs it) with the base weights, with the largest
//! stack merged, and after restoring, and whether the restored model's output is bit-identical to
//! the base one's. On CUDA it also captures a step as a CUDA graph on the base weights, merges the
//! largest stack and replays it: the replay must give the eager merged output (the merge writes
//! in place, so captured pointers stay valid). `merge_kernels` compares each merge kernel's weights
//! with an fp64 merge rounded to bf16 once, on the first blocks' weights (elements that differ, and
//! the largest difference over the magnitude of the element and its base value).
//!
//! ```text
//! cargo run --release -p ditfleet-engine --example lora_bench                  # CUDA, full size
//! cargo run -p ditfleet-engine --example lora_bench -- --tiny                  # CPU smoke test
//! cargo run -p ditfleet-engine --example lora_bench -- --check                 # tiny dry run that
//!                                                   # fails unless merge/restore/hot behave
//!   [--ranks 16,64] [--stacks 1,3] [--repeats N] [--steps N] [--size PX] [--txt-tokens N]
//!   [--device cpu|cuda:N] [--dir DIR] [--keep-files] [--no-pin] [--device-cache-gb N] [--seed N]
//! ```
//! Prints one JSON object. `--keep-files` leaves the adapter files in `--dir` (e.g. for
//! tests/fixtures/lora_bench_compare.py, the same timings with diffusers).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use ditfleet_engine::LoraRef;
use ditfleet_engine::flux::Pipeline;
use ditfleet_engine::flux::sampling::{self, SchedulerConfig};
use ditfleet_engine::flux::transformer::{Flux, Rope};
use ditfleet_engine::lora::flux::FluxLora;
use ditfleet_engine::lora::{
    Adapter, AdapterKey, Applier, ApplyOptions, Family, Format, LoraCache, LoraHub, LoraSlot, MergeKernel,
    SPLIT_BLOCK_BYTES,
};
use ditfleet_engine::parallel::graphs::{GraphCache, StepKey};
use serde_json::json;
use tch::{Device, Kind, Tensor};

struct Args {
    tiny: bool,
    check: bool,
    ranks: Vec<i64>,
    stacks: Vec<usize>,
    repeats: usize,
    steps: usize,
    size: i64,
    txt_tokens: i64,
    device: Device,
    dir: PathBuf,
    keep: bool,
    pin: bool,
    device_cache_gb: f64,
    seed: u64,
    profile: Option<PathBuf>,
}

fn parse() -> Result<Args> {
    let cuda = tch::Cuda::is_available();
    let mut a = Args {
        tiny: false,
        check: false,
        ranks: vec![16, 64],
        stacks: vec![1, 3],
        repeats: 3,
        steps: 5,
        size: 1024,
        txt_tokens: 512,
        device: if cuda { Device::Cuda(0) } else { Device::Cpu },
        dir: std::env::temp_dir().join(format!("ditfleet-lora-bench-{}", std::process::id())),
        keep: false,
        pin: cuda,
        device_cache_gb: 4.0,
        seed: 0,
        profile: None,
    };
    let list = |v: &str| -> Result<Vec<i64>> { v.split(',').map(|x| Ok(x.trim().parse()?)).collect() };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--tiny" => {
                a.tiny = true;
                a.ranks = vec![2, 4];
                a.size = 64;
                a.txt_tokens = 16;
                a.steps = 2;
                a.device = Device::Cpu;
                a.pin = false;
            }
            "--check" => {
                a.tiny = true;
                a.check = true;
                a.ranks = vec![2, 4];
                a.stacks = vec![1, 3];
                a.size = 32;
                a.txt_tokens = 8;
                a.steps = 1;
                a.repeats = 1;
                a.device = Device::Cpu;
                a.pin = false;
            }
            "--ranks" => a.ranks = list(&val()?)?,
            "--stacks" => a.stacks = list(&val()?)?.into_iter().map(|x| x as usize).collect(),
            "--repeats" => a.repeats = val()?.parse()?,
            "--steps" => a.steps = val()?.parse()?,
            "--size" => a.size = val()?.parse()?,
            "--txt-tokens" => a.txt_tokens = val()?.parse()?,
            "--device" => {
                a.device = match val()?.as_str() {
                    "cpu" => Device::Cpu,
                    d => Device::Cuda(d.strip_prefix("cuda:").context("--device cpu|cuda:N")?.parse()?),
                }
            }
            "--dir" => a.dir = PathBuf::from(val()?),
            "--keep-files" => a.keep = true,
            "--no-pin" => a.pin = false,
            "--device-cache-gb" => a.device_cache_gb = val()?.parse()?,
            "--seed" => a.seed = val()?.parse()?,
            "--profile" => a.profile = Some(PathBuf::from(val()?)),
            other => bail!("unknown flag {other} (see the file's docs)"),
        }
    }
    if a.stacks.is_empty() || a.stacks.contains(&0) || a.ranks.is_empty() || a.repeats == 0 {
        bail!("--ranks, --stacks and --repeats need positive values");
    }
    Ok(a)
}

fn sync(d: Device) {
    if let Device::Cuda(i) = d {
        tch::Cuda::synchronize(i as i64);
    }
}

/// The GPU's name from NVML (None on the CPU or without NVML).
fn gpu_name(d: Device) -> Option<String> {
    let Device::Cuda(i) = d else { return None };
    let nvml = nvml_wrapper::Nvml::init().ok()?;
    nvml.device_by_index(i as u32).ok()?.name().ok()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn rel_l2(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (a, b) = (a.f_to_kind(Kind::Double)?, b.f_to_kind(Kind::Double)?);
    Ok(f64::try_from(a.f_sub(&b)?.f_norm()?)? / f64::try_from(b.f_norm()?)?.max(1e-30))
}

/// Writes `count` random PEFT adapters of rank `r` covering every module of `family` (bf16).
fn write_adapters(family: &FluxLora, r: i64, count: usize, args: &Args) -> Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for j in 0..count {
        tch::manual_seed(args.seed as i64 * 1000 + r * 10 + j as i64);
        let mut named = Vec::new();
        // One name per module: the CLIP modules also answer to a name without `text_model.`.
        for (name, place) in family.modules(Format::Peft) {
            if name.starts_with("text_encoder.") && !name.starts_with("text_encoder.text_model.") {
                continue;
            }
            let shape = family
                .shape(&place.slices[0].var)
                .context("placement of an unknown weight")?;
            let inp = shape[1];
            let a = Tensor::f_randn([r, inp], (Kind::Float, Device::Cpu))?
                .f_mul_scalar(1.0 / (inp as f64).sqrt())?;
            let b = Tensor::f_randn([place.out, r], (Kind::Float, Device::Cpu))?.f_mul_scalar(0.01)?;
            named.push((format!("{name}.lora_A.weight"), a.f_to_kind(Kind::BFloat16)?));
            named.push((format!("{name}.lora_B.weight"), b.f_to_kind(Kind::BFloat16)?));
        }
        let path = args.dir.join(format!("rank{r}_{j}.safetensors"));
        let refs: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
        Tensor::write_safetensors(&refs, &path)?;
        paths.push(path);
    }
    Ok(paths)
}

/// The inputs of one denoising step, computed from the current weights (as a job does after its
/// stack is applied): embedded text, the step's row of the modulation table, RoPE.
struct StepInputs {
    x: Tensor,
    txt: Tensor,
    vec: Tensor,
    pe: Rope,
    key: StepKey,
}

fn step_inputs(model: &Flux, args: &Args, kind: Kind) -> Result<StepInputs> {
    let dev = args.device;
    let cfg = &model.config;
    let (lh, lw) = sampling::latent_size(args.size as u32, args.size as u32, 8);
    let x = sampling::pack(&sampling::noise(
        args.seed,
        cfg.in_channels / 4,
        lh,
        lw,
        kind,
        dev,
    )?)?;
    tch::manual_seed(args.seed as i64 + 1);
    let txt_raw =
        Tensor::f_randn([1, args.txt_tokens, cfg.context_in_dim], (kind, Device::Cpu))?.f_to_device(dev)?;
    let pooled = Tensor::f_randn([1, cfg.vec_in_dim], (kind, Device::Cpu))?.f_to_device(dev)?;
    let sched = sampling::schedule(&SchedulerConfig::dev(), 28, x.size()[1]);
    let t = Tensor::f_from_slice(&sched.timesteps[..1])?
        .f_to_device(dev)?
        .f_to_kind(kind)?
        .f_div_scalar(1000.0)?;
    let g = Tensor::f_full([1], 3.5, (Kind::Float, dev))?;
    let vec = model.modulation_table(&model.vec(&t, &pooled, Some(&g))?)?;
    let pe = model.rope(&Flux::position_ids(args.txt_tokens, lh, lw, dev)?)?;
    let key = StepKey(vec![0, args.txt_tokens, 0, x.size()[1], args.txt_tokens, lh, lw]);
    Ok(StepInputs {
        txt: model.embed_txt(&txt_raw)?,
        x,
        vec,
        pe,
        key,
    })
}

/// Median step time (ms, synchronized) and the last step's output.
fn step_time(model: &Flux, inp: &StepInputs, args: &Args) -> Result<(f64, Tensor)> {
    let mut times = Vec::new();
    let mut out = None;
    for i in 0..args.steps + 1 {
        let s = Instant::now();
        let v = model.forward_prepared(&inp.x, &inp.txt, &inp.vec, &inp.pe)?;
        sync(args.device);
        if i > 0 {
            times.push(s.elapsed().as_secs_f64() * 1e3); // the first is warm-up
        }
        out = Some(v);
    }
    Ok((median(times), out.context("no step ran")?))
}

/// The engine's per-job path on the pipeline's weights: cold (a fresh host cache reads the
/// files), hot, restore (a job without adapters), warm (from the host cache).
fn engine_path(
    family: &Arc<FluxLora>,
    weights: &dyn Fn() -> ditfleet_engine::lora::Weights,
    paths: &[PathBuf],
    r: i64,
    args: &Args,
) -> Result<serde_json::Value> {
    // Merging as an engine's hub on this device does (the settings' default device cache).
    let hub = LoraHub::with_options(usize::MAX, args.pin, LoraHub::settings_options(args.device));
    let family: Arc<dyn Family> = family.clone();
    let mut slot = LoraSlot::new(hub.clone(), family);
    let refs: Vec<LoraRef> = paths
        .iter()
        .enumerate()
        .map(|(j, p)| LoraRef {
            name: format!("rank{r}-{j}"),
            version: "1".into(),
            scale: 0.8,
            path: Some(p.clone()),
            checksum: Some(format!("bench{j}")),
        })
        .collect();
    let timed = |slot: &mut LoraSlot, loras: &[LoraRef]| -> Result<(f64, bool)> {
        let s = Instant::now();
        let rep = slot.prepare(loras, weights)?;
        sync(args.device);
        Ok((s.elapsed().as_secs_f64() * 1e3, rep.hot))
    };
    let (cold_ms, _) = timed(&mut slot, &refs)?;
    let (hot_ms, hot) = timed(&mut slot, &refs)?;
    let (restore_ms, _) = timed(&mut slot, &[])?;
    let (warm_ms, _) = timed(&mut slot, &refs)?;
    let status = hub.status();
    slot.reset()?;
    if args.check
        && (!hot || status.cache_misses != refs.len() as u64 || status.cache_hits != refs.len() as u64)
    {
        bail!("check: the engine path did not find its stack hot or read each file once: {status:?}");
    }
    Ok(json!({
        "rank": r, "adapters": refs.len(), "cold_ms": cold_ms, "hot_ms": hot_ms, "hot": hot,
        "restore_ms": restore_ms, "warm_ms": warm_ms,
        "cache_hits": status.cache_hits, "cache_misses": status.cache_misses, "cache_bytes": status.cache_bytes,
    }))
}

/// Each merge kernel's weights against an fp64 merge rounded once, on the first blocks' weights
/// (on the CPU the default is `Fp32`, so `Split` is forced there).
fn compare_kernels(
    family: &Arc<FluxLora>,
    weights: &dyn Fn() -> ditfleet_engine::lora::Weights,
    stack: &[(Arc<Adapter>, f64)],
) -> Result<serde_json::Value> {
    let names: Vec<String> = weights()
        .names()
        .filter(|n| n.contains("double_blocks.0.") || n.contains("single_blocks.0."))
        .filter(|n| n.ends_with(".weight"))
        .map(String::from)
        .collect();
    let run = |(kernel, fused_add): (MergeKernel, bool)| -> Result<Vec<Tensor>> {
        let mut a = Applier::new(
            family.clone(),
            weights(),
            ApplyOptions {
                kernel,
                fused_add,
                ..ApplyOptions::default()
            },
        );
        a.apply(stack)?;
        let got = names
            .iter()
            .map(|n| Ok(a.weights().get(n).context("weight")?.copy()))
            .collect::<Result<Vec<_>>>()?;
        a.release()?;
        Ok(got)
    };
    let cuda = weights()
        .names()
        .next()
        .and_then(|n| weights().get(n).map(|t| t.device().is_cuda()));
    // On CUDA `Auto` is `Split`, with the fused add and with ATen's (the same bits expected).
    let kernels: &[(MergeKernel, bool)] = if cuda == Some(true) {
        &[
            (MergeKernel::Fp32, true),
            (MergeKernel::Auto, true),
            (MergeKernel::Auto, false),
        ]
    } else {
        &[(MergeKernel::Fp32, true), (MergeKernel::Split, true)]
    };
    let results = kernels.iter().map(|&k| run(k)).collect::<Result<Vec<_>>>()?;
    // Every applier released: the weights are the base ones again. The reference: the same
    // merge on fp64 copies (an fp32 GEMM for the low-rank product, the sum in fp64), rounded to
    // bf16 once.
    let mut wide = ditfleet_engine::lora::Weights::new();
    let mut base = Vec::new();
    for n in &names {
        let t = weights().get(n).context("weight")?.f_to_kind(Kind::Double)?;
        wide.insert(n.clone(), &t);
        base.push(t);
    }
    let mut reference = Applier::new(
        family.clone(),
        wide,
        ApplyOptions {
            kernel: MergeKernel::Fp32,
            ..ApplyOptions::default()
        },
    );
    reference.apply(stack)?;
    let ideal = names
        .iter()
        .map(|n| {
            let kind = weights().get(n).context("weight")?.kind();
            Ok(reference.weights().get(n).context("weight")?.f_to_kind(kind)?)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut out = Vec::new();
    for ((kernel, fused_add), got) in kernels.iter().zip(&results) {
        let (mut elements, mut differ, mut worst) = (0i64, 0i64, 0f64);
        for ((a, b), w0) in got.iter().zip(&ideal).zip(&base) {
            elements += a.numel() as i64;
            differ += i64::try_from(a.f_ne_tensor(b)?.f_sum(Kind::Int64)?)?;
            let (af, bf) = (a.f_to_kind(Kind::Float)?, b.f_to_kind(Kind::Float)?);
            let w0 = w0.f_to_kind(Kind::Float)?;
            let scale = af
                .f_abs()?
                .f_maximum(&bf.f_abs()?)?
                .f_maximum(&w0.f_abs()?)?
                .f_clamp_min(1e-30)?;
            worst = worst.max(f64::try_from(af.f_sub(&bf)?.f_abs()?.f_div(&scale)?.f_max()?)?);
        }
        out.push(json!({
            "kernel": format!("{kernel:?}"), "fused_add": fused_add, "against": "fp64 merge rounded once",
            "dtype": format!("{:?}", ideal.first().map(|t| t.kind())),
            "weights": names.len(), "elements": elements,
            "differing": differ, "differing_fraction": differ as f64 / elements.max(1) as f64,
            "max_diff_over_magnitude": worst,
        }));
    }
    if let [_, fused, aten] = &results[..] {
        let mut differ = 0i64;
        for (a, b) in fused.iter().zip(aten) {
            differ += i64::try_from(a.f_ne_tensor(b)?.f_sum(Kind::Int64)?)?;
        }
        out.push(json!({"fused_add_vs_aten_add_differing": differ}));
    }
    Ok(serde_json::Value::Array(out))
}

fn main() -> Result<()> {
    let args = parse()?;
    let _guard = tch::no_grad_guard();
    let dev = args.device;
    std::fs::create_dir_all(&args.dir)?;
    let t = Instant::now();
    let pipe = if args.tiny {
        Pipeline::tiny_random(args.seed)?
    } else {
        Pipeline::random_dev(dev, Kind::BFloat16, args.seed)?
    };
    sync(dev);
    let build_s = t.elapsed().as_secs_f64();
    let kind = pipe.transformer.kind();
    let clip = pipe.resident_clip();
    let family = Arc::new(FluxLora::new(&pipe.transformer.config, clip.map(|c| &c.config)));
    let weights = || ditfleet_engine::lora::flux::weights(&pipe.transformer, clip);
    let most = *args.stacks.iter().max().unwrap_or(&1);

    // Base step time and output, before any merge.
    let base_inputs = step_inputs(&pipe.transformer, &args, kind)?;
    let (base_step_ms, base_out) = step_time(&pipe.transformer, &base_inputs, &args)?;

    let mut cases = Vec::new();
    let mut files = Vec::new();
    let mut largest = None;
    let mut engine = None;
    for &r in &args.ranks {
        let t = Instant::now();
        // Twice the largest stack: `switch` goes from the second half to the first.
        let paths = write_adapters(&family, r, 2 * most, &args)?;
        let write_s = t.elapsed().as_secs_f64();
        let bytes: u64 = paths
            .iter()
            .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
            .sum();
        files.push(json!({"rank": r, "files": paths.len(), "bytes": bytes, "write_s": write_s}));
        let keys: Vec<AdapterKey> = (0..paths.len())
            .map(|j| AdapterKey::new(format!("rank{r}-{j}"), "1", "bench"))
            .collect();
        for &n in &args.stacks {
            let options = ApplyOptions::default();
            let mut applier = Applier::new(family.clone(), weights(), options.clone());
            let device_options = ApplyOptions {
                device_cache_bytes: (args.device_cache_gb * 1e9) as usize,
                ..options
            };
            let (mut cold, mut cold_read, mut warm, mut warm_dev, mut hot, mut switch, mut restore) =
                (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
            let mut warm_dev_fp32 = vec![];
            let mut warm_dev_blocked = vec![];
            let mut warm_dev_aten_add = vec![];
            let mut touched = 0;
            let mut saved_bytes = 0;
            for _ in 0..args.repeats {
                // cold: an empty cache reads the files (and the originals are saved).
                let cache = LoraCache::new(usize::MAX).pinned(args.pin);
                let s = Instant::now();
                let load = |range: std::ops::Range<usize>| -> Result<Vec<(Arc<Adapter>, f64)>> {
                    range
                        .map(|j| Ok((cache.get_or_load(&keys[j], &paths[j])?.0, 0.8)))
                        .collect()
                };
                let stack = load(0..n)?;
                cold_read.push(s.elapsed().as_secs_f64() * 1e3);
                let rep = applier.apply(&stack)?;
                cold.push(s.elapsed().as_secs_f64() * 1e3);
                (touched, saved_bytes) = (rep.touched, rep.saved_bytes);
                restore.push(applier.restore()?.ms);
                // warm (host cache), hot.
                let stack = load(0..n)?;
                warm.push(applier.apply(&stack)?.ms);
                hot.push(applier.apply(&stack)?.ms);
                // switch: from stack B (adapters n..2n) to this one.
                applier.apply(&load(n..2 * n)?)?;
                switch.push(applier.apply(&stack)?.ms);
                // One set of saved originals on the GPU at a time.
                applier.release()?;
                if dev.is_cuda() && args.device_cache_gb > 0.0 {
                    for (kernel, block, fused_add, times) in [
                        (MergeKernel::Auto, 0, true, &mut warm_dev),
                        (MergeKernel::Auto, SPLIT_BLOCK_BYTES, true, &mut warm_dev_blocked),
                        (MergeKernel::Auto, 0, false, &mut warm_dev_aten_add),
                        (MergeKernel::Fp32, 0, true, &mut warm_dev_fp32),
                    ] {
                        let mut a = Applier::new(
                            family.clone(),
                            weights(),
                            ApplyOptions {
                                kernel,
                                split_block_bytes: block,
                                fused_add,
                                ..device_options.clone()
                            },
                        );
                        a.apply(&stack)?; // fills the device cache, saves the originals
                        a.restore()?;
                        times.push(a.apply(&stack)?.ms);
                        a.release()?;
                    }
                }
            }
            let warm_dev_ms = (!warm_dev.is_empty()).then(|| median(warm_dev));
            let warm_dev_fp32_ms = (!warm_dev_fp32.is_empty()).then(|| median(warm_dev_fp32));
            let warm_dev_blocked_ms = (!warm_dev_blocked.is_empty()).then(|| median(warm_dev_blocked));
            let warm_dev_aten_add_ms = (!warm_dev_aten_add.is_empty()).then(|| median(warm_dev_aten_add));
            cases.push(json!({
                "rank": r, "adapters": n, "touched_weights": touched, "saved_original_bytes": saved_bytes,
                "cold_ms": median(cold), "cold_read_ms": median(cold_read), "warm_host_ms": median(warm),
                "warm_device_ms": warm_dev_ms, "warm_device_fp32_ms": warm_dev_fp32_ms,
                "warm_device_blocked_ms": warm_dev_blocked_ms, "warm_device_aten_add_ms": warm_dev_aten_add_ms,
                "hot_ms": median(hot), "switch_ms": median(switch),
                "restore_ms": median(restore),
            }));
            eprintln!("{}", cases.last().map(|c| c.to_string()).unwrap_or_default());
            if n == most && Some(r) == args.ranks.iter().copied().max() {
                let cache = LoraCache::new(usize::MAX).pinned(args.pin);
                let stack: Vec<_> = (0..n)
                    .map(|j| Ok((cache.get_or_load(&keys[j], &paths[j])?.0, 0.8)))
                    .collect::<Result<_>>()?;
                largest = Some((r, n, stack));
                engine = Some(engine_path(&family, &weights, &paths[..n], r, &args)?);
            }
        }
        if !args.keep {
            for p in &paths {
                let _ = std::fs::remove_file(p);
            }
        }
    }

    // Step time with the largest stack merged, then after restoring.
    let (r, n, stack) = largest.context("no stack")?;
    let merge_kernels = compare_kernels(&family, &weights, &stack)?;
    // A kineto trace of one warm merge of that stack (the default options, adapters on the
    // device), for profile_summary.py.
    let profile = match &args.profile {
        Some(path) => {
            let mut a = Applier::new(
                family.clone(),
                weights(),
                ApplyOptions {
                    device_cache_bytes: (args.device_cache_gb * 1e9) as usize,
                    ..ApplyOptions::default()
                },
            );
            a.apply(&stack)?;
            a.restore()?;
            sync(dev);
            ditfleet_engine::aten::profiler_start()?;
            let ms = a.apply(&stack)?.ms;
            sync(dev);
            ditfleet_engine::aten::profiler_stop(path)?;
            a.release()?;
            Some(json!({"trace": path, "warm_device_ms": ms}))
        }
        None => None,
    };
    let mut applier = Applier::new(family.clone(), weights(), ApplyOptions::default());
    applier.apply(&stack)?;
    let lora_inputs = step_inputs(&pipe.transformer, &args, kind)?;
    let (lora_step_ms, lora_out) = step_time(&pipe.transformer, &lora_inputs, &args)?;
    // The graph check: capture on the base weights, replay with the stack merged.
    let graph = if let Device::Cuda(ordinal) = dev {
        applier.restore()?;
        let mut graphs = GraphCache::default();
        let b = &base_inputs;
        let fwd = |t: &[Tensor]| pipe.transformer.forward_prepared(&t[0], &t[1], &t[2], &b.pe);
        let held = [&b.pe.cos, &b.pe.sin, &b.pe.freqs];
        let captured = graphs.step(ordinal, &b.key, &[&b.x, &b.txt, &b.vec], &held, &fwd)?;
        applier.apply(&stack)?;
        let l = &lora_inputs;
        let replayed = graphs.step(ordinal, &l.key, &[&l.x, &l.txt, &l.vec], &held, &fwd)?;
        Some(json!({
            "captures": graphs.captures, "replays": graphs.replays,
            "captured_vs_eager_base_rel_l2": rel_l2(&captured, &base_out)?,
            "replayed_vs_eager_merged_rel_l2": rel_l2(&replayed, &lora_out)?,
        }))
    } else {
        None
    };
    applier.restore()?;
    let restored_inputs = step_inputs(&pipe.transformer, &args, kind)?;
    let (restored_step_ms, restored_out) = step_time(&pipe.transformer, &restored_inputs, &args)?;
    if !args.keep {
        let _ = std::fs::remove_dir(&args.dir);
    }
    let report = json!({
        "device": format!("{dev:?}"),
        "gpu": gpu_name(dev),
        "config": if args.tiny { "tiny" } else { "flux.1-dev (random weights)" },
        "dtype": format!("{kind:?}"),
        "build_s": build_s,
        "image": [args.size, args.size], "txt_tokens": args.txt_tokens, "steps_timed": args.steps,
        "pinned_host_copies": args.pin,
        "adapter_files": files,
        "cases": cases,
        "engine": engine,
        "step": {
            "stack": {"rank": r, "adapters": n, "scale": 0.8},
            "base_ms": base_step_ms, "merged_ms": lora_step_ms, "restored_ms": restored_step_ms,
            "merged_vs_base_output_rel_l2": rel_l2(&lora_out, &base_out)?,
            "restored_output_bit_identical": restored_out.f_equal(&base_out)?,
        },
        "cuda_graph": graph,
        "merge_kernels": merge_kernels,
        "profile": profile,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    if args.check {
        if !restored_out.f_equal(&base_out)? {
            bail!("check: the restored model's output is not the base one's");
        }
        if rel_l2(&lora_out, &base_out)? == 0.0 {
            bail!("check: the merged stack did not change the output");
        }
        // Different fp32 summation orders: an element may round the other way (a bf16 step of its
        // operands' magnitude, 2^-8), rarely.
        // bf16 weights only (the tiny pipeline is fp32: its kernels are checked by the tests).
        for m in merge_kernels
            .as_array()
            .into_iter()
            .flatten()
            .filter(|m| m["dtype"] == "Some(BFloat16)")
        {
            if m["max_diff_over_magnitude"].as_f64().unwrap_or(1.0) > 2f64.powi(-7)
                || m["differing_fraction"].as_f64().unwrap_or(1.0) > 0.01
            {
                bail!("check: the merge kernels disagree beyond rounding: {m}");
            }
        }
        eprintln!("check: ok");
    }
    Ok(())
}
