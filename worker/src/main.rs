//! `ditfleet-worker`: the GPU worker service (default) and a standalone `generate` command.

use std::io::IsTerminal;
use std::path::PathBuf;

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
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// Diffusers-layout Flux.1 checkpoint directory (default: the tiny random-weight config).
    #[arg(long, env = "FLUX_MODEL_DIR")]
    model_dir: Option<PathBuf>,
    /// Engine: flux or simulated.
    #[arg(long, default_value = "flux")]
    engine: String,
    #[arg(long)]
    prompt: String,
    #[arg(long)]
    negative_prompt: Option<String>,
    #[arg(long, default_value = "flux-dev")]
    model: String,
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
}

fn main() {
    let cli = Cli::parse();
    match cli.cmd.unwrap_or(Cmd::Serve) {
        Cmd::Serve => serve(),
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

fn serve() {
    ditfleet_common::service::run_service(
        "ditfleet-worker",
        WorkerConfig::from_env(&Env::process()),
        |c| &c.common,
        ditfleet_worker::run,
    )
}

fn generate(a: GenerateArgs) -> Result<()> {
    let choice = match a.engine.as_str() {
        "simulated" => EngineChoice::Simulated {
            step_ms: 20,
            version: "sim-1".into(),
            faults: Default::default(),
        },
        "flux" => EngineChoice::Flux {
            model_dir: a.model_dir.clone(),
            low_memory: a.low_memory,
            plan: a.plan.clone(),
            autotune: ditfleet_common::config::Autotune::from_env(&ditfleet_common::config::Env::process())?,
            fault_gpu: None,
        },
        other => anyhow::bail!("unknown engine {other:?} (flux or simulated)"),
    };
    let t = std::time::Instant::now();
    let mut engines =
        ditfleet_worker::engines::build(&choice, 1, a.devices.as_deref()).context("loading the engine")?;
    let engine = engines
        .iter_mut()
        .find(|e| e.info().models.contains(&a.model))
        .with_context(|| format!("the engine does not serve model {:?}", a.model))?;
    let info = engine.info();
    eprintln!(
        "engine {} ready in {:.2} s: {}",
        info.kind,
        t.elapsed().as_secs_f64(),
        info.note
    );
    let steps = a
        .steps
        .unwrap_or_else(|| ditfleet_common::job::JobSpec::default_steps(&a.model));
    let request = GenerateRequest {
        model: a.model.clone(),
        prompt: a.prompt.clone(),
        negative_prompt: a.negative_prompt.clone(),
        width: a.width,
        height: a.height,
        steps,
        guidance: a
            .guidance
            .unwrap_or_else(|| ditfleet_common::job::JobSpec::default_guidance(&a.model)),
        true_cfg_scale: a.true_cfg_scale,
        plan: None,
        seed: a.seed,
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
