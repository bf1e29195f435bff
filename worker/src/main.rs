//! `ditfleet-worker`: the GPU worker service (default), a standalone `generate` command, and the
//! model cache's `fetch-model` / `verify-model` (the chart's populate Job and init containers).

mod model_cache;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use ditfleet_common::config::{self, COMMON_VARS, EngineChoice, Env, WORKER_VARS, WorkerConfig};
use ditfleet_engine::{Control, GenerateRequest};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser)]
#[command(
    name = "ditfleet-worker",
    version,
    about = "ditfleet worker: consumes class queues and generates images (default), or generates one image locally.",
    after_help = config::help_text(&[COMMON_VARS, WORKER_VARS])
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

// Parsed once at start: the size of the `generate` arguments does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Run the worker service (the default).
    Serve,
    /// Generate one image locally, without the fleet.
    Generate(GenerateArgs),
    /// Fill the model cache: download a checkpoint version from S3 or HTTPS into
    /// <cache-dir>/<version>, checking every file's sha256, and publish it in one rename with a
    /// verification record. A version already present and intact is kept.
    FetchModel(FetchModelArgs),
    /// Check a checkpoint directory against its sha256 list before the worker starts. Files whose
    /// size and mtime match the verification record written when they were last hashed are
    /// trusted; the others are hashed.
    VerifyModel(VerifyModelArgs),
    /// Write a pre-quantised FP8 model version from a bf16 Flux.1 version: <to> gets <from>'s
    /// files (hard-linked where possible) but the transformer's weights,
    /// transformer/ditfleet-fp8.safetensors (the blocks quantised to FP8) and ditfleet.json
    /// saying fp8. Loading it reads about 14 GB of transformer weights instead of 24 and needs no
    /// quantisation pass.
    QuantizeFp8(QuantizeFp8Args),
}

#[derive(clap::Args)]
struct QuantizeFp8Args {
    /// The bf16 Flux.1 model version folder (diffusers layout).
    #[arg(long)]
    from: PathBuf,
    /// The new version folder (must not exist), e.g. <model_root>/FLUX.1-dev-fp8.
    #[arg(long)]
    to: PathBuf,
    /// Where to quantise: cuda:N (fast) or cpu.
    #[arg(long, default_value = "cuda:0")]
    device: String,
}

#[derive(clap::Args)]
struct FetchModelArgs {
    /// Where the checkpoint is read: s3://bucket/prefix (endpoint, region and credentials from
    /// AWS_*) or https://host/path (file <path> is <url>/<path>).
    #[arg(long, env = "DITFLEET_MODEL_SOURCE")]
    source: String,
    /// Bearer token sent to an https:// source (e.g. a Hugging Face token).
    #[arg(long, env = "DITFLEET_MODEL_SOURCE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The cache volume; the checkpoint lands in <cache-dir>/<version>.
    #[arg(long, env = "DITFLEET_MODEL_CACHE")]
    cache_dir: PathBuf,
    /// Version directory name (one path segment), e.g. FLUX.1-dev.
    #[arg(long)]
    version: String,
    /// sha256sum-format list of the files; missing or empty: <source>/<list-name>.
    #[arg(long)]
    checksums: Option<PathBuf>,
    /// Name of the checksum list in the source and in the version directory.
    #[arg(long, default_value = "SHA256SUMS")]
    list_name: String,
    /// Files downloaded at the same time.
    #[arg(long, default_value_t = 4)]
    parallel: usize,
    /// Hash every file of a copy already present instead of trusting its verification record.
    #[arg(long)]
    force: bool,
}

#[derive(clap::Args)]
struct VerifyModelArgs {
    /// The checkpoint directory.
    #[arg(long, env = "FLUX_MODEL_DIR")]
    model_dir: PathBuf,
    /// sha256sum-format list of the files; missing or empty: <model-dir>/<list-name>.
    #[arg(long)]
    checksums: Option<PathBuf>,
    /// Name of the checksum list in the model directory.
    #[arg(long, default_value = "SHA256SUMS")]
    list_name: String,
    /// Hash every file, whatever the verification record says.
    #[arg(long)]
    force: bool,
    /// Rewrite a stale verification record (the directory must be writable).
    #[arg(long)]
    write_record: bool,
    /// Wait this long for the model directory to appear (a populate Job still downloading).
    #[arg(long, default_value_t = 0)]
    wait_seconds: u64,
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// Diffusers-layout model directory, Flux.1 or SDXL (also read from FLUX_MODEL_DIR; default:
    /// the tiny random-weight Flux and SDXL configs).
    #[arg(long, env = "DITFLEET_MODEL_DIR")]
    model_dir: Option<PathBuf>,
    /// Engine: flux (the real pipelines, Flux.1 or SDXL) or simulated.
    #[arg(long, default_value = "flux")]
    engine: String,
    #[arg(long)]
    prompt: String,
    #[arg(long)]
    negative_prompt: Option<String>,
    /// Model: flux-dev, flux-schnell or sdxl-base (default: the model directory's model, else
    /// flux-dev).
    #[arg(long)]
    model: Option<String>,
    #[arg(long, default_value_t = 1024)]
    width: u32,
    #[arg(long, default_value_t = 1024)]
    height: u32,
    #[arg(long)]
    steps: Option<u32>,
    #[arg(long)]
    guidance: Option<f32>,
    /// True CFG scale (with --negative-prompt; 1 = off).
    #[arg(long, default_value_t = 1.0)]
    true_cfg_scale: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Sampler: euler (SDXL's default), euler_a, dpmpp_2m, dpmpp_2m_karras (SDXL) or flow_euler
    /// (Flux); default: the model's.
    #[arg(long)]
    scheduler: Option<String>,
    /// Parallel plan over --devices, e.g. ulysses=2 (default: one device).
    #[arg(long, env = "DITFLEET_PLAN")]
    plan: Option<String>,
    /// Devices, e.g. cuda:0 or cpu (default: auto).
    #[arg(long, value_delimiter = ',')]
    devices: Option<Vec<String>>,
    /// Output PNG path.
    #[arg(long)]
    out: PathBuf,
    /// Generate this many times in one process (timings printed for each; the image of the last
    /// run is written). The first run includes one-time warm-up work.
    #[arg(long, default_value_t = 1)]
    repeat: u32,
    /// Low-memory mode: the text encoders are loaded for each request and freed after encoding
    /// (also `DITFLEET_LOW_MEMORY=1`).
    #[arg(long, env = "DITFLEET_LOW_MEMORY", value_parser = clap::builder::BoolishValueParser::new())]
    low_memory: bool,
    /// Numeric format of the Flux transformer: bf16 or fp8 (also `DITFLEET_PRECISION`; the model
    /// folder's ditfleet.json overrides it; SDXL is bf16 only).
    #[arg(long, env = "DITFLEET_PRECISION", default_value = "bf16", value_parser = ["bf16", "fp8"])]
    precision: String,
}

fn main() {
    let cli = Cli::parse();
    // The engine's settings, parsed once from the environment and handed to the engine.
    match ditfleet_engine::settings::EngineSettings::parse(&|k| std::env::var(k).ok())
        .and_then(ditfleet_engine::settings::install)
    {
        Ok(()) => {}
        Err(e) => {
            eprintln!("ditfleet-worker: {e}");
            std::process::exit(ditfleet_common::config::EXIT_BAD_CONFIG);
        }
    }
    match cli.cmd.unwrap_or(Cmd::Serve) {
        Cmd::Serve => serve(),
        Cmd::FetchModel(args) => cache_command("fetch-model", || fetch_model(args)),
        Cmd::VerifyModel(args) => cache_command("verify-model", || verify_model(args)),
        Cmd::QuantizeFp8(args) => cache_command("quantize-fp8", || quantize_fp8(args)),
        Cmd::Generate(args) => {
            ditfleet_common::telemetry::init(
                &std::env::var("DITFLEET_LOG").unwrap_or_else(|_| "warn".into()),
                false,
            );
            if let Err(e) = generate(args) {
                eprintln!("ditfleet-worker generate: {e:#}");
                std::process::exit(1);
            }
        }
    }
}

fn quantize_fp8(a: QuantizeFp8Args) -> Result<()> {
    let device = match a.device.as_str() {
        "cpu" => tch::Device::Cpu,
        d => match d.strip_prefix("cuda:").and_then(|i| i.parse().ok()) {
            Some(i) => tch::Device::Cuda(i),
            None => anyhow::bail!("--device {d:?}: must be cpu or cuda:N"),
        },
    };
    use ditfleet_engine::flux::fp8::Fp8VersionStage;
    let started = std::time::Instant::now();
    // One bar: a spinner while the transformer loads and while it is written, the layer count
    // while it is quantised; plain lines where stderr is not a terminal.
    let tty = std::io::stderr().is_terminal();
    let bar = ProgressBar::new_spinner();
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    let spin = ProgressStyle::with_template("{spinner} {msg} {elapsed}").expect("template");
    let layers = ProgressStyle::with_template("quantising [{bar:30}] {pos}/{len} layers {elapsed} eta {eta}")
        .expect("template")
        .progress_chars("=> ");
    let r = ditfleet_engine::flux::fp8::write_fp8_version(&a.from, &a.to, device, &mut |stage| match stage {
        Fp8VersionStage::Loading { bytes } => {
            bar.set_style(spin.clone());
            let msg = format!(
                "loading the transformer ({:.1} GiB)",
                bytes as f64 / (1u64 << 30) as f64
            );
            if !tty {
                eprintln!("{msg}");
            }
            bar.set_message(msg);
        }
        Fp8VersionStage::Quantising { done, total } => {
            if done == 1 {
                bar.set_style(layers.clone());
                bar.set_length(total as u64);
            }
            bar.set_position(done as u64);
            if !tty && (done == total || done % 50 == 0) {
                eprintln!("quantised {done}/{total} layers");
            }
        }
        Fp8VersionStage::Writing => {
            bar.set_style(spin.clone());
            if !tty {
                eprintln!("writing the FP8 transformer");
            }
            bar.set_message("writing the FP8 transformer");
        }
    });
    bar.finish_and_clear();
    let r = r?;
    tracing::info!(
        to = %a.to.display(),
        transformer_gib = r.transformer_bytes as f64 / (1u64 << 30) as f64,
        files = r.files,
        secs = started.elapsed().as_secs_f64(),
        "fp8 model version written"
    );
    Ok(())
}

fn serve() {
    ditfleet_common::service::run_service(
        "ditfleet-worker",
        WorkerConfig::from_env(&Env::process()),
        |c| &c.common,
        ditfleet_worker::run,
    )
}

/// Runs a model cache command with the service's log settings; exit status 1 on failure.
fn cache_command(name: &str, run: impl FnOnce() -> Result<()>) {
    let env = |k: &str| std::env::var(k).ok();
    ditfleet_common::telemetry::init(
        &env("DITFLEET_LOG").unwrap_or_else(|| "info".into()),
        env("DITFLEET_LOG_FORMAT").as_deref() == Some("json"),
    );
    if let Err(e) = run() {
        tracing::error!("{name}: {e:#}");
        std::process::exit(1);
    }
}

fn fetch_model(a: FetchModelArgs) -> Result<()> {
    let given = match &a.checksums {
        Some(path) => model_cache::Checksums::read(path)?,
        None => None,
    };
    let source = model_cache::Source::parse(&a.source, a.token.filter(|t| !t.is_empty()))?;
    let opts = model_cache::FetchOptions {
        parallel: a.parallel,
        force: a.force,
        list_name: a.list_name,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let report = runtime.block_on(model_cache::fetch(
        &source,
        &a.cache_dir,
        &a.version,
        given,
        &opts,
    ))?;
    if report.already_present {
        println!(
            "{}: present and verified ({} files)",
            report.dir.display(),
            report.files
        );
    } else {
        println!(
            "{}: downloaded, verified and published ({} files, {:.2} GiB)",
            report.dir.display(),
            report.files,
            report.bytes as f64 / (1u64 << 30) as f64
        );
    }
    Ok(())
}

fn verify_model(a: VerifyModelArgs) -> Result<()> {
    if !model_cache::wait_for(
        &a.model_dir,
        Duration::from_secs(a.wait_seconds),
        Duration::from_secs(10),
    ) {
        anyhow::bail!(
            "{} does not exist{} (populate the cache first: the chart's model-populate Job or `ditfleet-worker fetch-model`)",
            a.model_dir.display(),
            if a.wait_seconds > 0 {
                format!(" after waiting {} s", a.wait_seconds)
            } else {
                String::new()
            }
        );
    }
    let given = match &a.checksums {
        Some(path) => model_cache::Checksums::read(path)?,
        None => None,
    };
    let list = match given {
        Some(list) => list,
        None => {
            let path = a.model_dir.join(ditfleet_common::ident::segment(
                "checksum list name",
                &a.list_name,
            )?);
            model_cache::Checksums::read(&path)?.ok_or_else(|| {
                model_cache::CacheError::NoList(format!(
                    "{} is missing or empty and no --checksums list was given",
                    path.display()
                ))
            })?
        }
    };
    let opts = model_cache::VerifyOptions {
        force: a.force,
        write_record: a.write_record,
    };
    let report = model_cache::verify(&a.model_dir, &list, opts)?;
    if report.record_written {
        tracing::info!("verification record written");
    }
    if report.record_stale {
        tracing::warn!(
            hashed = report.hashed.len(),
            "the verification record does not match the files, so they were hashed; refresh it \
             (run the populate Job again, or verify-model --write-record on a writable mount) so \
             the next start does not hash them again"
        );
    }
    println!(
        "{}: {} files verified ({} trusted from the record, {} hashed)",
        a.model_dir.display(),
        list.len(),
        report.trusted.len(),
        report.hashed.len()
    );
    Ok(())
}

fn generate(a: GenerateArgs) -> Result<()> {
    let choice = match a.engine.as_str() {
        "simulated" => EngineChoice::Simulated {
            step_ms: 20,
            load_ms: 0,
            lora_apply_ms: 0,
            version: "sim-1".into(),
            faults: Default::default(),
            models: ditfleet_common::job::KNOWN_MODELS
                .iter()
                .map(|m| m.to_string())
                .collect(),
        },
        "flux" => EngineChoice::Flux {
            // The older name of the variable, as the worker service reads it.
            model_dir: a.model_dir.clone().or_else(|| {
                std::env::var_os("FLUX_MODEL_DIR")
                    .filter(|d| !d.is_empty())
                    .map(PathBuf::from)
            }),
            low_memory: a.low_memory,
            plan: a.plan.clone(),
            autotune: ditfleet_common::config::Autotune::from_env(&ditfleet_common::config::Env::process())?,
            fault_gpu: None,
            precision: a.precision.clone(),
        },
        other => anyhow::bail!("unknown engine {other:?} (flux or simulated)"),
    };
    let t = std::time::Instant::now();
    let mut engines =
        ditfleet_worker::engines::build(&choice, 1, a.devices.as_deref()).context("loading the engine")?;
    let model = match &a.model {
        Some(m) => m.clone(),
        None => engines
            .first()
            .and_then(|e| e.info().models.first().cloned())
            .unwrap_or_else(|| "flux-dev".into()),
    };
    let engine = engines
        .iter_mut()
        .find(|e| e.info().models.contains(&model))
        .with_context(|| format!("the engine does not serve model {model:?}"))?;
    let info = engine.info();
    eprintln!(
        "engine {} ({}) ready in {:.2} s: {}",
        info.kind,
        info.precision,
        t.elapsed().as_secs_f64(),
        info.note
    );
    let steps = a
        .steps
        .unwrap_or_else(|| ditfleet_common::job::JobSpec::default_steps(&model));
    let request = GenerateRequest {
        model: model.clone(),
        prompt: a.prompt.clone(),
        negative_prompt: a.negative_prompt.clone(),
        width: a.width,
        height: a.height,
        steps,
        guidance: a
            .guidance
            .unwrap_or_else(|| ditfleet_common::job::JobSpec::default_guidance(&model)),
        true_cfg_scale: a.true_cfg_scale,
        plan: None,
        seed: a.seed,
        scheduler: a.scheduler.clone(),
        loras: Vec::new(),
    };
    let tty = std::io::stderr().is_terminal();
    let repeat = a.repeat.max(1);
    for run in 1..=repeat {
        let bar = ProgressBar::new(u64::from(steps));
        bar.set_style(
            ProgressStyle::with_template("denoising [{bar:30}] {pos}/{len} steps {elapsed} eta {eta}")
                .expect("template")
                .progress_chars("=> "),
        );
        let t_run = std::time::Instant::now();
        let image = engine
            .generate(&request, &mut |ev| {
                bar.set_position(u64::from(ev.step));
                if !tty && (ev.step == ev.total || ev.step % 10 == 0) {
                    eprintln!(
                        "step {}/{} ({:.2} s)",
                        ev.step,
                        ev.total,
                        ev.elapsed.as_secs_f64()
                    );
                }
                Control::Continue
            })
            .context("generating")?;
        let gen_ms = t_run.elapsed().as_secs_f64() * 1e3;
        bar.finish();
        if run == repeat {
            std::fs::write(&a.out, image.to_png()?)
                .with_context(|| format!("writing {}", a.out.display()))?;
            println!("wrote {}", a.out.display());
        }
        let tm = &image.timings;
        println!(
            "{}stages: text encode {:.0} ms | denoise {:.0} ms | decode {:.0} ms | generate {:.0} ms{}",
            if repeat > 1 {
                format!("run {run}/{repeat} ")
            } else {
                String::new()
            },
            tm.encode_ms,
            tm.denoise_ms,
            tm.decode_ms,
            gen_ms,
            match (
                tm.peak_memory_bytes,
                tm.peak_memory_encode_bytes,
                tm.peak_memory_denoise_bytes,
                tm.peak_memory_decode_bytes,
            ) {
                (Some(all), Some(e), Some(d), Some(v)) => {
                    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
                    format!(
                        " | peak device memory {:.2} GiB (encode {:.2}, denoise {:.2}, decode {:.2})",
                        gib(all),
                        gib(e),
                        gib(d),
                        gib(v)
                    )
                }
                (Some(all), ..) => format!(
                    " | peak device memory {:.2} GiB",
                    all as f64 / (1u64 << 30) as f64
                ),
                _ => String::new(),
            }
        );
    }
    Ok(())
}
