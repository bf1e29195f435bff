//! `ditfleetctl`: submit jobs and watch them, inspect status and workers, cancel jobs.
//! Never links libtorch. Reads the same `DITFLEET_*` variables as the services.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use ditfleet_common::amqp::{self, Publisher, now_ms, persistent};
use ditfleet_common::config::{self, COMMON_VARS, CommonConfig, Env};
use ditfleet_common::job::{JobEvent, JobSpec, Limits, Priority, SCHEMA_VERSION};
use ditfleet_common::state::{JobState, JobStore, WorkerInfo};
use ditfleet_common::topology::Topology;
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser)]
#[command(name = "ditfleetctl", version, about = "Submit text-to-image jobs to a ditfleet and operate it.",
          after_help = config::help_text(&[COMMON_VARS]))]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Submit a job (from flags or a JSON file) and optionally wait for its image.
    Submit(Box<SubmitArgs>),
    /// Show a job's status.
    Status {
        job_id: String,
        /// Print the raw status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List live workers.
    Workers {
        #[arg(long)]
        json: bool,
    },
    /// Cancel a job: a queued job never starts; a running one stops at its next step.
    Cancel { job_id: String },
}

#[derive(clap::Args)]
struct SubmitArgs {
    /// A job JSON file (contract v1); flags are ignored when given.
    #[arg(long)]
    file: Option<PathBuf>,
    #[arg(long, required_unless_present = "file")]
    prompt: Option<String>,
    #[arg(long)]
    negative_prompt: Option<String>,
    #[arg(long, default_value = "flux-dev")]
    model: String,
    #[arg(long)]
    model_version: Option<String>,
    #[arg(long, default_value_t = 1024)]
    width: u32,
    #[arg(long, default_value_t = 1024)]
    height: u32,
    #[arg(long)]
    steps: Option<u32>,
    #[arg(long)]
    guidance: Option<f32>,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long, env = "DITFLEET_TENANT", default_value = "default")]
    tenant: String,
    #[arg(long, value_enum, default_value = "normal")]
    priority: PriorityArg,
    /// Job id (default: a new UUID). Resubmitting the same id never runs the job twice.
    #[arg(long)]
    job_id: Option<String>,
    /// RFC 3339 deadline.
    #[arg(long)]
    deadline: Option<String>,
    #[arg(long)]
    reply_to: Option<String>,
    /// Label as key=value (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Wait for the result, showing progress.
    #[arg(long)]
    wait: bool,
    /// Seconds to wait with --wait.
    #[arg(long, default_value_t = 3600)]
    timeout_s: u64,
    /// Skip the local validation (the scheduler validates anyway).
    #[arg(long)]
    no_validate: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum PriorityArg {
    Low,
    Normal,
    High,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("label {s:?} is not key=value"))
}

fn main() {
    let cli = Cli::parse();
    let cfg = match CommonConfig::from_env(&Env::process()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ditfleetctl: {e}");
            std::process::exit(config::EXIT_BAD_CONFIG);
        }
    };
    ditfleet_common::telemetry::init(
        &std::env::var("DITFLEET_LOG").unwrap_or_else(|_| "warn".into()),
        false,
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let code = rt.block_on(async move {
        match dispatch(cli.cmd, cfg).await {
            Ok(code) => code,
            Err(e) => {
                eprintln!("ditfleetctl: {e:#}");
                1
            }
        }
    });
    std::process::exit(code);
}

async fn dispatch(cmd: Cmd, cfg: CommonConfig) -> Result<i32> {
    match cmd {
        Cmd::Submit(args) => submit(*args, &cfg).await,
        Cmd::Status { job_id, json } => status(&job_id, json, &cfg).await,
        Cmd::Workers { json } => workers(json, &cfg).await,
        Cmd::Cancel { job_id } => cancel(&job_id, &cfg).await,
    }
}

async fn store(cfg: &CommonConfig) -> Result<JobStore> {
    JobStore::connect(&cfg.redis_url, &cfg.namespace, cfg.job_ttl)
        .await
        .with_context(|| format!("connecting to Redis at {}", config::redact_url(&cfg.redis_url)))
}

fn build_spec(a: &SubmitArgs) -> Result<(JobSpec, Vec<u8>)> {
    if let Some(path) = &a.file {
        let body = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let spec = JobSpec::parse(&body).with_context(|| format!("{} is not a v1 job", path.display()))?;
        return Ok((spec, body));
    }
    let spec = JobSpec {
        schema_version: SCHEMA_VERSION,
        job_id: a
            .job_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        tenant: a.tenant.clone(),
        model: a.model.clone(),
        model_version: a.model_version.clone(),
        prompt: a.prompt.clone().unwrap_or_default(),
        negative_prompt: a.negative_prompt.clone(),
        width: a.width,
        height: a.height,
        steps: a.steps,
        guidance: a.guidance,
        seed: a.seed,
        priority: match a.priority {
            PriorityArg::Low => Priority::Low,
            PriorityArg::Normal => Priority::Normal,
            PriorityArg::High => Priority::High,
        },
        deadline: a.deadline.clone(),
        reply_to: a.reply_to.clone(),
        labels: a.labels.iter().cloned().collect::<BTreeMap<_, _>>(),
    };
    let body = serde_json::to_vec(&spec)?;
    Ok((spec, body))
}

async fn submit(a: SubmitArgs, cfg: &CommonConfig) -> Result<i32> {
    let (spec, body) = build_spec(&a)?;
    if !a.no_validate {
        spec.validate(&Limits {
            max_prompt_chars: ditfleet_common::job::SCHEMA_MAX_PROMPT_CHARS,
        })
        .context("the job is invalid (use --no-validate to let the scheduler record the rejection)")?;
    }
    let topo = Topology::new(&cfg.namespace);
    let conn = amqp::connect(&cfg.amqp_url, "ditfleetctl")
        .await
        .with_context(|| format!("connecting to RabbitMQ at {}", config::redact_url(&cfg.amqp_url)))?;
    let ch = conn.create_channel().await?;
    topo.declare(&ch, &[])
        .await
        .context("declaring the submit topology")?;
    // Subscribe before publishing so no event can be missed.
    let events = if a.wait {
        Some(
            topo.subscribe_events(&ch, &format!("job.{}.*", spec.job_id))
                .await?,
        )
    } else {
        None
    };
    let publisher = Publisher::new(&conn).await?;
    let submitted = Instant::now();
    let props = persistent("application/json")
        .with_message_id(spec.job_id.as_str().into())
        .with_headers(amqp::headers(&[("x-submitted-ms", now_ms().to_string())]));
    publisher
        .publish(
            &topo.submit_exchange(),
            ditfleet_common::topology::SUBMIT_KEY,
            &body,
            props,
            true,
        )
        .await
        .context("publishing the job")?;
    let Some(mut events) = events else {
        println!("{}", spec.job_id);
        return Ok(0);
    };
    eprintln!(
        "submitted job {} ({}x{}, model {})",
        spec.job_id, spec.width, spec.height, spec.model
    );
    let bar = ProgressBar::new(u64::from(
        spec.steps.unwrap_or_else(|| JobSpec::default_steps(&spec.model)),
    ));
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg:<12} [{bar:30}] {pos}/{len} steps  {elapsed}")
            .expect("template")
            .progress_chars("=> "),
    );
    bar.set_message("queued");
    let tty = std::io::stderr().is_terminal();
    let deadline = tokio::time::sleep(Duration::from_secs(a.timeout_s));
    tokio::pin!(deadline);
    loop {
        let delivery = tokio::select! {
            _ = &mut deadline => {
                bar.abandon_with_message("timed out");
                eprintln!("no result after {} s; `ditfleetctl status {}` shows where it is", a.timeout_s, spec.job_id);
                return Ok(2);
            }
            d = events.next() => match d {
                Some(Ok(d)) => d,
                Some(Err(e)) => bail!("event stream failed: {e}"),
                None => bail!("event stream closed"),
            }
        };
        let ev: JobEvent = match serde_json::from_slice(&delivery.data) {
            Ok(ev) => ev,
            Err(e) => {
                eprintln!("ignoring an unreadable event: {e}");
                continue;
            }
        };
        match ev {
            JobEvent::Progress {
                step, total, worker, ..
            } => {
                bar.set_length(u64::from(total));
                bar.set_position(u64::from(step));
                bar.set_message("running");
                if !tty && (step == 1 || step == total || step % 10 == 0) {
                    eprintln!("  step {step}/{total} on {worker}");
                }
            }
            JobEvent::Done {
                result_url,
                worker,
                engine,
                attempts,
                queue_wait_ms,
                generate_ms,
                store_ms,
                end_to_end_ms,
                timings,
                ..
            } => {
                bar.finish_with_message("done");
                let path = result_url.strip_prefix("file://").unwrap_or(&result_url);
                let f = |k: &str| timings.get(k).and_then(|v| v.as_f64()).unwrap_or(0.0);
                println!(
                    "job {} succeeded on worker {worker} (engine: {engine}, attempt {attempts})",
                    spec.job_id
                );
                println!("image: {path}");
                println!(
                    "stages: queue wait {queue_wait_ms} ms | generate {generate_ms} ms (text encode {:.0} ms, denoise {:.0} ms, decode {:.0} ms) | store {store_ms} ms | end to end {end_to_end_ms} ms",
                    f("encode_ms"),
                    f("denoise_ms"),
                    f("decode_ms")
                );
                println!("client round trip: {} ms", submitted.elapsed().as_millis());
                return Ok(0);
            }
            JobEvent::Failed { state, reason, .. } => {
                bar.abandon_with_message(state.clone());
                println!("job {} {state}: {reason}", spec.job_id);
                return Ok(1);
            }
            JobEvent::Cancelled { at_step, .. } => {
                bar.abandon_with_message("cancelled");
                println!(
                    "job {} cancelled{}",
                    spec.job_id,
                    at_step.map(|s| format!(" at step {s}")).unwrap_or_default()
                );
                return Ok(1);
            }
        }
    }
}

async fn status(job_id: &str, json: bool, cfg: &CommonConfig) -> Result<i32> {
    let s = store(cfg).await?;
    let mut h = s.get(job_id).await?;
    if h.is_empty() {
        eprintln!("no job {job_id:?} (never submitted, or its status expired)");
        return Ok(3);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&h)?);
        return Ok(0);
    }
    h.remove("spec");
    let mut keys: Vec<_> = h.keys().cloned().collect();
    keys.sort_by_key(|k| (k != "state", k.clone()));
    for k in keys {
        println!("{k:<16} {}", h[&k]);
    }
    Ok(0)
}

async fn workers(json: bool, cfg: &CommonConfig) -> Result<i32> {
    let s = store(cfg).await?;
    let list = s.workers().await?;
    let infos: Vec<WorkerInfo> = list
        .iter()
        .filter_map(|(_, v)| serde_json::from_str(v).ok())
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&infos)?);
        return Ok(0);
    }
    if infos.is_empty() {
        println!("no live workers");
        return Ok(0);
    }
    println!(
        "{:<24} {:<9} {:<22} {:>5} {:<26} {:<18} {:>6} {:>9}",
        "WORKER", "STATE", "CLASSES", "FREE", "MODELS", "GPUS", "DEGREE", "HEARTBEAT"
    );
    let now = now_ms();
    for w in infos {
        let gpus = if w.gpus.is_empty() {
            w.devices.join(",")
        } else {
            format!("{}x {}", w.gpus.len(), w.gpus[0].name.replace("NVIDIA ", ""))
        };
        println!(
            "{:<24} {:<9} {:<22} {:>2}/{:<2} {:<26} {:<18} {:>6} {:>7}ms",
            w.id,
            w.state,
            w.classes.join(","),
            w.free_slots,
            w.slots,
            w.model_versions.join(","),
            gpus,
            w.parallel_degree,
            now.saturating_sub(w.heartbeat_ms)
        );
        if !w.engine_note.is_empty() {
            println!("  {} engine: {}", w.engine, w.engine_note);
        }
    }
    Ok(0)
}

async fn cancel(job_id: &str, cfg: &CommonConfig) -> Result<i32> {
    let s = store(cfg).await?;
    let (applied, prev) = s
        .transition(
            job_id,
            &[
                Some(JobState::Queued),
                Some(JobState::Routed),
                Some(JobState::Running),
            ],
            JobState::Cancelled,
            None,
            &[
                ("finished_ms", now_ms().to_string()),
                ("error", "cancelled by operator".into()),
            ],
        )
        .await?;
    match (applied, prev) {
        (true, Some(JobState::Running)) => {
            println!("job {job_id} cancelled; its worker stops it at the next step");
        }
        (true, _) => {
            // Nobody runs it: announce the cancellation here.
            let topo = Topology::new(&cfg.namespace);
            let conn = amqp::connect(&cfg.amqp_url, "ditfleetctl").await?;
            let ch = conn.create_channel().await?;
            topo.declare(&ch, &[]).await?;
            let p = Publisher::new(&conn).await?;
            let ev = JobEvent::Cancelled {
                job_id: job_id.to_string(),
                at_step: None,
            };
            p.publish(
                &topo.events_exchange(),
                &ev.routing_key(),
                &serde_json::to_vec(&ev)?,
                persistent("application/json"),
                false,
            )
            .await?;
            println!("job {job_id} cancelled before it started");
        }
        (false, None) => {
            eprintln!("no job {job_id:?}");
            return Ok(3);
        }
        (false, Some(st)) => {
            eprintln!("job {job_id} is already {st}; nothing to cancel");
            return Ok(4);
        }
    }
    Ok(0)
}
